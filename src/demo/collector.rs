//! The reference collector the demo runs, and what it wrote, reduced the way a central
//! consumer would.

use crate::collect::CollectConfig;
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What the collector wrote, reduced the way a central consumer would.
#[derive(Debug, Default)]
pub(super) struct CollectorView {
    /// Window length (s) → sum of `count` over the highest version per (series, start).
    pub(super) counts: BTreeMap<u64, u64>,
    /// (rule, state) → alert lines.
    pub(super) alerts: BTreeMap<(String, String), u64>,
    pub(super) aggregate_lines: u64,
    pub(super) windows: u64,
}

impl CollectorView {
    /// Reads every `*.jsonl` under `out` (a line being written is skipped).
    pub(super) fn read(out: &Path) -> CollectorView {
        let mut best: BTreeMap<(String, String, u64), (u64, u64)> = BTreeMap::new();
        let mut v = CollectorView::default();
        let Ok(rd) = std::fs::read_dir(out) else {
            return v;
        };
        for f in rd.flatten() {
            let Ok(text) = std::fs::read_to_string(f.path()) else {
                continue;
            };
            for line in text.lines() {
                let Ok(l) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                match l["kind"].as_str() {
                    Some("aggregate") => {
                        v.aggregate_lines += 1;
                        let key = (
                            l["series"].as_str().unwrap_or_default().to_string(),
                            l["window_start"].as_str().unwrap_or_default().to_string(),
                            l["window_secs"].as_u64().unwrap_or(0),
                        );
                        let version = l["version"].as_u64().unwrap_or(0);
                        let count = l["count"].as_u64().unwrap_or(0);
                        let e = best.entry(key).or_insert((0, 0));
                        if version >= e.0 {
                            *e = (version, count);
                        }
                    }
                    Some("alert") => {
                        let key = (
                            l["rule"].as_str().unwrap_or_default().to_string(),
                            l["state"].as_str().unwrap_or_default().to_string(),
                        );
                        *v.alerts.entry(key).or_insert(0) += 1;
                    }
                    _ => {}
                }
            }
        }
        v.windows = best.len() as u64;
        for ((_, _, secs), (_, count)) in best {
            *v.counts.entry(secs).or_insert(0) += count;
        }
        v
    }
}

/// The reference collector, stopped and restarted on the same port and data directory.
pub(super) struct Collector {
    pub(super) dir: PathBuf,
    pub(super) addr: String,
    pub(super) running: Option<(CancellationToken, JoinHandle<Result<()>>)>,
}

impl Collector {
    pub(super) async fn start(dir: &Path) -> Result<Collector> {
        let mut c = Collector {
            dir: dir.to_path_buf(),
            addr: "127.0.0.1:0".into(),
            running: None,
        };
        let addr_file = dir.join(crate::collect::server::ADDR_FILE);
        let _ = std::fs::remove_file(&addr_file);
        c.spawn();
        let started = Instant::now();
        loop {
            if let Ok(a) = std::fs::read_to_string(&addr_file)
                && let Ok(sock) = a.trim().parse::<std::net::SocketAddr>()
            {
                c.addr = sock.to_string();
                return Ok(c);
            }
            c.check_alive().await?;
            if started.elapsed() > Duration::from_secs(10) {
                bail!("the collector did not start listening within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(super) fn spawn(&mut self) {
        let mut cfg = CollectConfig::new(self.addr.clone(), self.dir.clone());
        cfg.shutdown_timeout = Duration::from_secs(5);
        let stop = CancellationToken::new();
        let task = tokio::spawn(crate::collect::run(cfg, stop.clone()));
        self.running = Some((stop, task));
    }

    /// Fails if the collector task ended (e.g. it could not listen).
    pub(super) async fn check_alive(&mut self) -> Result<()> {
        if let Some((_, task)) = &mut self.running
            && task.is_finished()
        {
            let (_, task) = self.running.take().expect("running");
            return match task.await {
                Ok(Ok(())) => bail!("the collector stopped by itself"),
                Ok(Err(e)) => Err(e.context("collector")),
                Err(e) => bail!("the collector panicked: {e}"),
            };
        }
        Ok(())
    }

    pub(super) fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    pub(super) fn is_running(&self) -> bool {
        self.running.is_some()
    }

    pub(super) async fn stop(&mut self) -> Result<()> {
        if let Some((stop, task)) = self.running.take() {
            stop.cancel();
            match task.await {
                Ok(r) => r.context("collector")?,
                Err(e) => bail!("the collector panicked: {e}"),
            }
        }
        Ok(())
    }

    /// Starts again on the same address, retrying briefly while the port is released.
    pub(super) async fn restart(&mut self) -> Result<()> {
        let started = Instant::now();
        loop {
            self.spawn();
            tokio::time::sleep(Duration::from_millis(100)).await;
            match self.check_alive().await {
                Ok(()) => {
                    if tokio::net::TcpStream::connect(&self.addr).await.is_ok() {
                        return Ok(());
                    }
                    self.check_alive().await?;
                }
                Err(e) if started.elapsed() > Duration::from_secs(5) => {
                    return Err(e.context(format!("cannot restart the collector on {}", self.addr)));
                }
                Err(e) => tracing::warn!("collector restart: {e:#}; retrying"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agg(series: &str, start: &str, secs: u64, version: u64, count: u64) -> String {
        serde_json::json!({
            "kind": "aggregate", "series": series, "window_start": start,
            "window_secs": secs, "version": version, "count": count,
        })
        .to_string()
    }

    #[test]
    fn only_the_highest_version_of_each_window_counts_and_a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let lines = [
            agg("t{site=a}", "2026-01-01T00:00:00Z", 5, 1, 4),
            agg("t{site=a}", "2026-01-01T00:00:00Z", 5, 2, 5), // a late-data correction
            agg("t{site=a}", "2026-01-01T00:00:05Z", 5, 1, 3),
            agg("t{site=a}", "2026-01-01T00:00:00Z", 10, 1, 8),
            serde_json::json!({"kind": "alert", "rule": "overheat", "state": "raised"}).to_string(),
        ];
        let mut text = lines.join("\n");
        text.push_str("\n{\"kind\":\"aggregate\",\"series\":\"t"); // being written
        std::fs::write(dir.path().join("gw.jsonl"), text).unwrap();
        let v = CollectorView::read(dir.path());
        assert_eq!(v.counts.get(&5), Some(&8), "5 (v2) + 3, not 4 + 5 + 3");
        assert_eq!(v.counts.get(&10), Some(&8));
        assert_eq!(v.aggregate_lines, 4);
        assert_eq!(v.windows, 3);
        assert_eq!(
            v.alerts.get(&("overheat".into(), "raised".into())),
            Some(&1)
        );
    }

    #[test]
    fn a_missing_output_directory_is_an_empty_view() {
        let v = CollectorView::read(Path::new("/nonexistent/edgeferry-demo-out"));
        assert!(v.counts.is_empty() && v.alerts.is_empty());
    }
}
