//! The command-line front-ends: what `check-config`, `status`, `tail`, `store verify|repair`,
//! `dump-journal`, `run`, `collect` and `demo` print, and the exit code each returns. `main.rs`
//! only parses the command line and calls one of these.
//!
//! Exit codes (the same for every command, so scripts and systemd units can rely on them):
//! 0 success, 1 configuration error, 2 runtime failure or daemon unreachable, 3 unhealthy
//! (`status`) or damage found (`store verify`).

use crate::Config;
use crate::model::StatusReport;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Done, healthy, clean.
    Success,
    /// The configuration could not be loaded; every problem was printed.
    Config,
    /// A runtime failure, or the daemon could not be reached.
    Runtime,
    /// `status`: the daemon reports itself unhealthy; `store verify`: damage found.
    Unhealthy,
}

impl Exit {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Config => 1,
            Exit::Runtime => 2,
            Exit::Unhealthy => 3,
        }
    }
}

/// Loads the configuration, or prints every problem in it (to stderr) and says so. The one
/// place where "load the configuration or stop" is written.
pub fn load_config(path: &Path) -> Result<Config, Exit> {
    Config::load(path).map_err(|e| {
        eprint!("{e}");
        Exit::Config
    })
}

/// `edgeferry check-config`: the effective configuration (secrets redacted) or every problem.
pub fn check_config(path: &Path) -> Exit {
    match load_config(path) {
        Ok(cfg) => {
            println!("# {}: OK\n", path.display());
            for w in cfg.warnings() {
                println!("# warning: {w}");
            }
            print!("{}", cfg.to_redacted_toml());
            Exit::Success
        }
        Err(e) => e,
    }
}

/// Runs `serve` (given the shutdown token) on a multi-threaded runtime of two workers
/// (gateways have 1–4 cores; more threads only cost memory) until it ends; SIGTERM/SIGINT
/// cancel the token. `what` prefixes the error printed when it fails.
fn until_signalled<F, E>(what: &str, serve: impl FnOnce(CancellationToken) -> F) -> Exit
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name(what.replace(' ', "-"))
        .build();
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{what}: cannot start the async runtime: {e}");
            return Exit::Runtime;
        }
    };
    let result = rt.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(crate::daemon::watch_signals(shutdown.clone()));
        serve(shutdown).await
    });
    match result {
        Ok(()) => Exit::Success,
        Err(e) => {
            // `{:#}` shows an error's causes (anyhow's chain; plain Display otherwise).
            tracing::error!("{e:#}");
            eprintln!("{what}: {e:#}");
            Exit::Runtime
        }
    }
}

/// `edgeferry run`: the daemon in the foreground until SIGTERM/SIGINT; SIGHUP reloads
/// `path` (the file `cfg` came from).
pub fn run_daemon(cfg: Config, path: &Path) -> Exit {
    crate::telemetry::init(&cfg.log);
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    until_signalled("edgeferry", |shutdown| {
        crate::daemon::run(cfg, Some(path), shutdown)
    })
}

/// `edgeferry collect`: the reference central receiver until SIGTERM/SIGINT.
#[cfg(feature = "central")]
pub fn run_collect(cfg: crate::collect::CollectConfig) -> Exit {
    crate::telemetry::init(&crate::telemetry::LogConfig::default());
    until_signalled("edgeferry collect", |shutdown| async move {
        let health = crate::collect::Health::default();
        if let Some(addr) = &cfg.metrics_listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen for metrics on {addr}: {e}"))?;
            let bound = listener.local_addr()?;
            std::fs::create_dir_all(&cfg.data_dir)?;
            std::fs::write(cfg.data_dir.join("metrics.addr"), bound.to_string())?;
            tracing::info!("collector metrics on http://{bound}/metrics");
            let h = health.clone();
            tokio::spawn(crate::admin::serve_metrics(
                listener,
                shutdown.clone(),
                move || h.unhealthy(),
                health.routes(),
            ));
        }
        crate::collect::run_with(cfg, shutdown, health).await
    })
}

/// `edgeferry load`: the JetStream → PostgreSQL loader until SIGTERM/SIGINT.
#[cfg(feature = "central")]
pub fn run_load(cfg: crate::collect::load::LoadConfig) -> Exit {
    crate::telemetry::init(&crate::telemetry::LogConfig::default());
    until_signalled("edgeferry load", |shutdown| async move {
        if let Some(addr) = &cfg.metrics_listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen for metrics on {addr}: {e}"))?;
            tracing::info!(
                "loader metrics on http://{}/metrics",
                listener.local_addr()?
            );
            let health = crate::collect::load::health();
            tokio::spawn(crate::admin::serve_metrics(
                listener,
                shutdown.clone(),
                health,
                axum::Router::new(),
            ));
        }
        crate::collect::load::run(cfg, shutdown).await
    })
}

/// `edgeferry demo`: success only when the closing report matches.
#[cfg(all(feature = "central", feature = "embedded-broker"))]
pub fn demo(opts: crate::demo::DemoOptions) -> Exit {
    match crate::demo::run(opts) {
        Ok(true) => Exit::Success,
        Ok(false) => Exit::Runtime,
        Err(e) => {
            eprintln!("edgeferry demo: {e:#}");
            Exit::Runtime
        }
    }
}

/// `edgeferry dump-journal`: every journal record as a JSON line on stdout.
pub fn dump_journal(cfg: &Config) -> Exit {
    match crate::daemon::dump_journal(cfg, &mut std::io::stdout().lock()) {
        Ok(()) => Exit::Success,
        Err(e) => {
            eprintln!("edgeferry: {e}");
            Exit::Runtime
        }
    }
}

/// Which store tool to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreTool {
    /// Read everything, change nothing.
    Verify,
    /// Salvage like start-up does, move every damaged piece into one dated folder.
    Repair,
}

/// `edgeferry store verify|repair`: the report as text or JSON; verify exits 3 on damage,
/// repair 2 when damage remains.
pub fn store(cfg: &Config, tool: StoreTool, json: bool) -> Exit {
    let data_dir = &cfg.gateway.data_dir;
    let print = |text: String, value: serde_json::Result<String>| {
        if json {
            match value {
                Ok(s) => println!("{s}"),
                Err(e) => eprintln!("edgeferry store: cannot encode the report: {e}"),
            }
        } else {
            print!("{text}");
        }
    };
    match tool {
        StoreTool::Verify => match crate::check::verify(data_dir) {
            Ok(r) => {
                print(r.to_string(), serde_json::to_string_pretty(&r));
                if r.clean {
                    Exit::Success
                } else {
                    Exit::Unhealthy
                }
            }
            Err(e) => {
                eprintln!("edgeferry store verify: {e}");
                Exit::Runtime
            }
        },
        StoreTool::Repair => {
            crate::telemetry::init(&cfg.log);
            match crate::check::repair(data_dir, cfg.store.segment_bytes()) {
                Ok(r) => {
                    print(r.to_string(), serde_json::to_string_pretty(&r));
                    if r.after.clean {
                        Exit::Success
                    } else {
                        eprintln!("edgeferry store repair: damage remains (see above)");
                        Exit::Runtime
                    }
                }
                Err(e) => {
                    eprintln!("edgeferry store repair: {e}");
                    Exit::Runtime
                }
            }
        }
    }
}

/// `edgeferry tail`: success when stopped (Ctrl-C, or the daemon shut down); runtime failure
/// when the daemon is unreachable or the connection broke.
pub fn tail(cfg: &Config, series: Option<&str>) -> Exit {
    let addr = crate::admin::resolve_addr(&cfg.admin.listen, &cfg.gateway.data_dir);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edgeferry tail: cannot start the async runtime: {e}");
            return Exit::Runtime;
        }
    };
    let ended = rt.block_on(async {
        let stop = async {
            use tokio::signal::unix::{SignalKind, signal};
            match (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) {
                (Ok(mut int), Ok(mut term)) => {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                    }
                }
                _ => std::future::pending().await,
            }
        };
        crate::live::tail(
            &addr,
            series,
            &mut std::io::stdout(),
            &mut std::io::stderr(),
            stop,
        )
        .await
    });
    match ended {
        Ok(crate::live::TailEnd::Stopped) => Exit::Success,
        Ok(crate::live::TailEnd::DaemonClosed(reason)) => {
            eprintln!(
                "edgeferry tail: the daemon closed the feed{}",
                if reason.is_empty() {
                    String::new()
                } else {
                    format!(": {reason}")
                }
            );
            Exit::Success
        }
        Err(e @ crate::live::TailError::Connect { .. }) => {
            eprintln!("edgeferry tail: {e}\nis it running? (systemctl status edgeferry)");
            Exit::Runtime
        }
        Err(e) => {
            eprintln!("edgeferry tail: {e}");
            Exit::Runtime
        }
    }
}

/// `edgeferry status`: the daemon's report for a human (or its JSON); unhealthy or degraded
/// (readings lost recently) exits 3, an unreachable daemon 2.
pub fn status(cfg: &Config, json: bool) -> Exit {
    let addr = crate::admin::resolve_addr(&cfg.admin.listen, &cfg.gateway.data_dir);
    let body = match crate::admin::http_get(&addr, "/status", Duration::from_secs(3)) {
        Ok((200, body)) => body,
        Ok((code, body)) => {
            eprintln!("edgeferry status: {addr} answered HTTP {code}: {body}");
            return Exit::Runtime;
        }
        Err(e) => {
            eprintln!(
                "edgeferry status: cannot reach the daemon's admin endpoint at {addr}: {e}\n\
                 is it running? (systemctl status edgeferry)"
            );
            return Exit::Runtime;
        }
    };
    let report: StatusReport = match serde_json::from_str(&body) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("edgeferry status: unexpected answer from {addr}: {e}");
            return Exit::Runtime;
        }
    };
    if json {
        println!("{body}");
    } else {
        print!("{}", render_status(&report));
    }
    if report.healthy && report.degraded.is_empty() {
        Exit::Success
    } else {
        Exit::Unhealthy
    }
}

/// Renders a status report for a human (`edgeferry status`).
pub fn render_status(r: &StatusReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "edgeferry {} on gateway {}: {} (up {})",
        r.version,
        r.gateway,
        if !r.healthy {
            "UNHEALTHY"
        } else if !r.degraded.is_empty() {
            "DEGRADED"
        } else {
            "HEALTHY"
        },
        humantime::format_duration(Duration::from_secs(r.uptime_secs))
    );
    let _ = writeln!(
        s,
        "broker   {} — {}{}, {} reconnects",
        r.broker.url,
        if r.broker.connected {
            "connected"
        } else {
            "DOWN"
        },
        if r.broker.subscribed {
            ", subscribed"
        } else {
            ""
        },
        r.broker.reconnects
    );
    let _ = writeln!(
        s,
        "ingest   {} messages, {} readings journaled, {} rejected, {} redeliveries dropped",
        r.ingest.messages, r.ingest.readings, r.ingest.rejected, r.ingest.duplicates_dropped
    );
    let _ = writeln!(
        s,
        "process  {} series, {} windows emitted, {} alerts active ({} events), {} budget violations",
        r.process.series,
        r.process.windows_emitted,
        r.process.alerts_active,
        r.process.alerts,
        r.process.budget_violations
    );
    let _ = writeln!(
        s,
        "backlog  {} batches, {} items, {} bytes, oldest {}{}",
        r.backlog.batches,
        r.backlog.items,
        r.backlog.bytes,
        r.backlog
            .oldest_age_secs
            .map(|a| format!("{a} s ago"))
            .unwrap_or_else(|| "-".into()),
        if r.process.dropped_items > 0 {
            format!(
                ", {} items DROPPED at the disk quota",
                r.process.dropped_items
            )
        } else {
            String::new()
        }
    );
    match &r.upstream {
        Some(u) => {
            let _ = writeln!(
                s,
                "upstream {} — {}, {} batches sent, {} acknowledged, {} reconnects{}",
                u.url,
                if u.connected { "connected" } else { "DOWN" },
                u.batches_sent,
                u.batches_acked,
                u.reconnects,
                match u.switches {
                    0 => String::new(),
                    n => format!(", {n} switches between URLs"),
                }
            );
        }
        None => {
            let _ = writeln!(s, "upstream none configured (batches stay in the outbox)");
        }
    }
    let c = &r.clock;
    let _ = writeln!(
        s,
        "clock    {}{}{}",
        if c.synchronised {
            "synchronised"
        } else {
            "NOT synchronised (sensor timestamps are accepted, not judged)"
        },
        match (&c.last_step, c.steps) {
            (Some(last), n) => format!(", {n} step(s), the last {last}"),
            _ => String::new(),
        },
        if c.ahead_of_wall_ms > 0 {
            format!(
                ", arrival times {} ahead of the wall clock",
                crate::clock::human(c.ahead_of_wall_ms as u64)
            )
        } else {
            String::new()
        }
    );
    let _ = writeln!(s, "disk     {}", render_disk_writes(&r.disk));
    for p in &r.problems {
        let _ = writeln!(s, "PROBLEM  {p}");
    }
    for d in &r.degraded {
        let _ = writeln!(s, "DEGRADED {d}");
    }
    if !r.rejected_recent.is_empty() {
        let _ = writeln!(s, "last rejected messages (oldest first):");
        for m in &r.rejected_recent {
            let _ = writeln!(
                s,
                "  {} {} [{}] {} — payload: {:?}",
                m.time, m.topic, m.reason, m.detail, m.payload
            );
        }
    }
    s
}

/// "disk writes: 1.2 MB/day" (decimal units, as cards are rated), with the years a rated
/// endurance lasts at that rate when `[store] endurance` is set.
fn render_disk_writes(d: &crate::model::status::DiskWrites) -> String {
    let mb = |b: u64| b as f64 / 1e6;
    let mut s = match (d.per_day_bytes, d.written_bytes) {
        (Some(per_day), Some(total)) => format!(
            "writes: {:.1} MB/day (last 10 min), {:.1} MB since start",
            mb(per_day),
            mb(total)
        ),
        (None, Some(total)) => format!(
            "writes: {:.1} MB since start (a rate after the first minute)",
            mb(total)
        ),
        _ => "writes: not measured (no /proc/self/io)".to_string(),
    };
    if let (Some(e), Some(years)) = (d.endurance_bytes, d.years_to_endurance) {
        s.push_str(&format!(
            "; the card's rated {} lasts {years:.1} years at this rate",
            bytesize::ByteSize::b(e).display().si()
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> StatusReport {
        serde_json::from_value(serde_json::json!({
            "version": "9.9.9", "gateway": "gw-1", "healthy": false, "ready": true, "uptime_secs": 3725,
            "broker": {"url": "mqtt://127.0.0.1:1883", "connected": true, "subscribed": true, "reconnects": 2, "last_error": null},
            "ingest": {"messages": 10, "readings": 12, "rejected": 1, "duplicates_dropped": 3},
            "process": {"series": 4, "windows_emitted": 5, "alerts_active": 1, "alerts": 2,
                        "budget_violations": 0, "dropped_items": 7, "blocked": false},
            "backlog": {"batches": 2, "items": 9, "bytes": 512, "oldest_age_secs": 40},
            "upstream": {"url": "wss://central:9443", "connected": false, "batches_sent": 6,
                         "batches_acked": 4, "reconnects": 1, "last_error": "refused"},
            "problems": ["upstream unreachable for 40 s"],
            "rejected_recent": [],
            "disk": {"written_bytes": 12_500_000, "per_day_bytes": 1_234_000_000,
                     "endurance_bytes": 40_000_000_000_000_u64, "years_to_endurance": 88.8},
        }))
        .expect("a StatusReport in its JSON form")
    }

    #[test]
    fn the_status_page_says_what_is_wrong_first_and_every_count_after() {
        let text = render_status(&report());
        let first = text.lines().next().unwrap();
        assert_eq!(
            first,
            "edgeferry 9.9.9 on gateway gw-1: UNHEALTHY (up 1h 2m 5s)"
        );
        for want in [
            "broker   mqtt://127.0.0.1:1883 — connected, subscribed, 2 reconnects",
            "12 readings journaled, 1 rejected, 3 redeliveries dropped",
            "backlog  2 batches, 9 items, 512 bytes, oldest 40 s ago, 7 items DROPPED at the disk quota",
            "upstream wss://central:9443 — DOWN, 6 batches sent, 4 acknowledged, 1 reconnects",
            "PROBLEM  upstream unreachable for 40 s",
            "clock    NOT synchronised (sensor timestamps are accepted, not judged)",
            "disk     writes: 1234.0 MB/day (last 10 min), 12.5 MB since start; the card's rated 40.0 TB lasts 88.8 years at this rate",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }

    #[test]
    fn the_clock_line_tells_steps_and_how_far_arrival_times_run_ahead() {
        let mut r = report();
        r.clock.synchronised = true;
        r.clock.steps = 2;
        r.clock.last_step = Some("back by 1h at 2026-12-03T10:00:00.000Z".into());
        r.clock.ahead_of_wall_ms = 3_599_000;
        let text = render_status(&r);
        assert!(
            text.contains(
                "clock    synchronised, 2 step(s), the last back by 1h at \
                 2026-12-03T10:00:00.000Z, arrival times 59m 59s ahead of the wall clock"
            ),
            "{text}"
        );
    }

    #[test]
    fn readings_lost_recently_make_a_working_daemon_degraded() {
        let mut r = report();
        r.healthy = true;
        r.problems.clear();
        assert!(render_status(&r).starts_with("edgeferry 9.9.9 on gateway gw-1: HEALTHY"));
        r.degraded = vec!["3 reading(s) dropped as too late since start".into()];
        let text = render_status(&r);
        assert!(
            text.starts_with("edgeferry 9.9.9 on gateway gw-1: DEGRADED"),
            "{text}"
        );
        assert!(text.contains("DEGRADED 3 reading(s) dropped as too late since start"));
    }

    #[test]
    fn exit_codes_are_the_documented_ones() {
        let codes: Vec<u8> = [Exit::Success, Exit::Config, Exit::Runtime, Exit::Unhealthy]
            .iter()
            .map(|e| e.code())
            .collect();
        assert_eq!(codes, [0, 1, 2, 3]);
    }
}
