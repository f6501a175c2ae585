//! `edgeferry demo`: the whole product on this machine, in one process, with nothing installed
//! beforehand.
//!
//! ```text
//!  9 simulated sensors ─MQTT QoS 1─▶ embedded broker (rumqttd) ─▶ edgeferry (daemon::run)
//!                                                                   │ journal, windows, rules,
//!                                                                   │ outbox
//!                                                                   ▼ ws://
//!                                                       reference collector (collect::run)
//! ```
//!
//! Everything listens on 127.0.0.1 ephemeral ports and keeps its data in one directory (a
//! temporary one, removed at the end, unless `--keep DIR`). Midway the collector is stopped
//! for a quarter of the run and restarted on the same port with the same data directory, so
//! the outbox backlog grows and drains. A status line is printed every second from the
//! admin endpoint's `/status`.
//!
//! The closing report compares what the sensors published (PUBACKed publishes) with what
//! the collector received: for each window length, the sum of `count` over the highest
//! `version` of every (series, window_start). To make that comparison exact, the sensors are
//! stopped first, then the demo waits until every window holding a published reading has
//! closed (window length + allowed lateness) and reached the collector (checkpoint interval +
//! linger), and only then stops edgeferry, then the collector. The embedded broker has no
//! shutdown (rumqttd): it ends with the process.

use crate::clock::now_ms;
use crate::collect::CollectConfig;
use crate::ingest::embedded::EmbeddedBroker;
use crate::model::StatusReport;
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What `edgeferry demo` was asked to do.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// How long the sensors publish.
    pub duration: Duration,
    /// Keep the data here (must be empty or not exist) instead of a temporary directory.
    pub keep: Option<PathBuf>,
}

/// The shortest run for which the timeline (overheat, silence, upstream cut) makes sense.
pub const MIN_DURATION: Duration = Duration::from_secs(10);

const GATEWAY: &str = "demo-gateway";
const SITES: [&str; 3] = ["greenhouse", "warehouse", "cellar"];
const DEVICES: [&str; 3] = ["sensor-1", "sensor-2", "sensor-3"];
/// The device that overheats, and the one that falls silent.
const HOT: (&str, &str) = ("warehouse", "sensor-2");
const SILENT: (&str, &str) = ("cellar", "sensor-3");
const PUBLISH_EVERY: Duration = Duration::from_millis(200);
/// Window lengths (seconds): short, so windows close and travel within a short demo.
const WINDOWS: [u64; 2] = [5, 10];
const LATENESS: Duration = Duration::from_secs(1);
const CHECKPOINT: Duration = Duration::from_secs(1);
const LINGER: Duration = Duration::from_millis(500);
const OVERHEAT_ABOVE: f64 = 80.0;
const OVERHEAT_CLEAR: f64 = 75.0;
const OVERHEAT_PEAK: f64 = 92.0;
/// Longer than the wait for the last windows at the end (the longest window + lateness +
/// checkpoint + linger), so stopping the sensors does not make every series "silent".
const SILENT_FOR: Duration = Duration::from_secs(15);

/// When things happen, as offsets from the start of publishing.
#[derive(Debug, Clone, Copy)]
struct Timeline {
    duration: Duration,
    heat_from: Duration,
    heat_peak: Duration,
    heat_to: Duration,
    silent_at: Duration,
    cut_from: Duration,
    cut_to: Duration,
}

impl Timeline {
    fn new(duration: Duration) -> Timeline {
        let at = |f: f64| duration.mul_f64(f);
        // The silent device must stay silent for SILENT_FOR (plus a little) before the end.
        let latest = duration.saturating_sub(SILENT_FOR + Duration::from_secs(3));
        let silent_at = at(0.3).min(latest).max(Duration::from_secs(2));
        Timeline {
            duration,
            heat_from: at(0.15),
            heat_peak: at(0.40),
            heat_to: at(0.65),
            silent_at,
            cut_from: at(0.45),
            cut_to: at(0.70),
        }
    }

    /// Degrees added to the overheating device's reading at `t`.
    fn heat(&self, t: Duration, base: f64) -> f64 {
        let rise = OVERHEAT_PEAK - base;
        if t <= self.heat_from || t >= self.heat_to {
            0.0
        } else if t <= self.heat_peak {
            rise * (t - self.heat_from).as_secs_f64()
                / (self.heat_peak - self.heat_from).as_secs_f64()
        } else {
            rise * (self.heat_to - t).as_secs_f64() / (self.heat_to - self.heat_peak).as_secs_f64()
        }
    }
}

/// Runs the demo; `Ok(true)` when the closing report matches.
pub fn run(opts: DemoOptions) -> Result<bool> {
    if opts.duration < MIN_DURATION {
        bail!(
            "--duration {}: expected at least {}",
            humantime::format_duration(opts.duration),
            humantime::format_duration(MIN_DURATION)
        );
    }
    let dir = DemoDir::create(opts.keep.clone())?;
    init_logging(&dir.path.join("demo.log"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("edgeferry-demo")
        .build()
        .context("cannot start the async runtime")?;
    let result = rt.block_on(run_async(opts.duration, &dir.path));
    // Keep the evidence when something went wrong.
    let keep = dir.keep || !matches!(result, Ok(true));
    if keep {
        println!("data kept in {}", dir.path.display());
    } else {
        println!(
            "data removed: {} (use --keep DIR to keep it)",
            dir.path.display()
        );
    }
    drop(rt);
    dir.finish(keep);
    result
}

/// The demo's directory: `--keep DIR`, or a fresh one under the system's temp dir.
struct DemoDir {
    path: PathBuf,
    keep: bool,
}

impl DemoDir {
    fn create(keep: Option<PathBuf>) -> Result<DemoDir> {
        match keep {
            Some(path) => {
                if path.exists()
                    && std::fs::read_dir(&path)
                        .with_context(|| format!("--keep {}", path.display()))?
                        .next()
                        .is_some()
                {
                    bail!(
                        "--keep {}: expected an empty or new directory (the demo's counts \
                         would include an earlier run's data)",
                        path.display()
                    );
                }
                std::fs::create_dir_all(&path)
                    .with_context(|| format!("cannot create {}", path.display()))?;
                Ok(DemoDir { path, keep: true })
            }
            None => {
                let path = std::env::temp_dir().join(format!(
                    "edgeferry-demo-{}-{:08x}",
                    std::process::id(),
                    rand::random::<u32>()
                ));
                std::fs::create_dir(&path)
                    .with_context(|| format!("cannot create {}", path.display()))?;
                Ok(DemoDir { path, keep: false })
            }
        }
    }

    fn finish(self, keep: bool) {
        if !keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Logs go to DIR/demo.log (the terminal shows the demo's own lines); errors also to stderr.
fn init_logging(path: &Path) -> Result<()> {
    use tracing_subscriber::prelude::*;
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let filter = crate::telemetry::quiet_embedded_broker(
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    );
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_target(false)
                .with_writer(std::sync::Mutex::new(file))
                .with_filter(filter),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .with_target(false)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr)
                .with_filter(crate::telemetry::quiet_embedded_broker(
                    tracing_subscriber::EnvFilter::new("error"),
                )),
        )
        .try_init();
    Ok(())
}

/// Seconds since `t0`, for line prefixes.
fn stamp(t0: Instant) -> String {
    format!("[{:>4}s]", t0.elapsed().as_secs())
}

async fn run_async(duration: Duration, dir: &Path) -> Result<bool> {
    let timeline = Timeline::new(duration);
    let broker = tokio::task::spawn_blocking(|| EmbeddedBroker::start("127.0.0.1:0"))
        .await
        .context("embedded broker start-up panicked")??;

    let collector_dir = dir.join("collector");
    let mut collector = Collector::start(&collector_dir).await?;

    let gateway_dir = dir.join("gateway");
    let config_path = dir.join("config.toml");
    std::fs::write(
        &config_path,
        demo_config(&gateway_dir, &broker.url(), &collector.url()),
    )
    .with_context(|| format!("cannot write {}", config_path.display()))?;
    let cfg = crate::Config::load(&config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let daemon_stop = CancellationToken::new();
    let mut daemon: JoinHandle<Result<(), crate::daemon::DaemonError>> =
        tokio::spawn(crate::daemon::run(cfg, daemon_stop.clone()));

    // Wait until edgeferry recovered its state and the broker acknowledged its subscription.
    let admin = wait_ready(&gateway_dir, &mut daemon).await?;
    let interrupt = CancellationToken::new();
    tokio::spawn(watch_interrupts(interrupt.clone()));

    println!(
        "edgeferry demo: {} sites x {} sensors -> embedded MQTT broker -> edgeferry -> collector, for {}",
        SITES.len(),
        DEVICES.len(),
        humantime::format_duration(duration)
    );
    println!("  dashboard   http://{admin}/");
    println!("  metrics     http://{admin}/metrics   (status: http://{admin}/status)");
    println!("  broker      {} (embedded rumqttd)", broker.url());
    println!(
        "  collector   {} -> {}",
        collector.url(),
        collector_dir
            .join("out")
            .join(format!("{GATEWAY}.jsonl"))
            .display()
    );
    println!("  config      {}", config_path.display());
    println!("  log         {}", dir.join("demo.log").display());
    println!(
        "  timeline    {}/{} overheats {}-{}s; {}/{} falls silent at {}s (alert {}s later); \
         upstream cut {}-{}s",
        HOT.0,
        HOT.1,
        timeline.heat_from.as_secs(),
        timeline.heat_to.as_secs(),
        SILENT.0,
        SILENT.1,
        timeline.silent_at.as_secs(),
        SILENT_FOR.as_secs(),
        timeline.cut_from.as_secs(),
        timeline.cut_to.as_secs()
    );
    println!("  Ctrl-C ends early (with the same closing report)");

    // Sensors.
    let t0 = Instant::now();
    let sensors_stop = CancellationToken::new();
    let mut sensors = Vec::new();
    for (si, site) in SITES.iter().enumerate() {
        for (di, device) in DEVICES.iter().enumerate() {
            let spec = SensorSpec {
                site,
                device,
                temp_base: 21.0 + (si as f64 - 1.0) * 1.5 + (di as f64 - 1.0) * 0.4,
                hum_base: 45.0 + (si as f64 - 1.0) * 6.0 - (di as f64 - 1.0) * 2.0,
                overheats: (*site, *device) == HOT,
                silent_at: ((*site, *device) == SILENT).then_some(timeline.silent_at),
            };
            let stats = Arc::new(SensorStats::default());
            let task = tokio::spawn(run_sensor(
                spec,
                broker.addr().port(),
                stats.clone(),
                timeline,
                t0,
                sensors_stop.clone(),
            ));
            sensors.push((stats, task));
        }
    }

    // The live phase: one status line a second, the upstream cut, the announcements.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<(Instant, u64)> = None;
    let mut said = Announced::default();
    let mut daemon_failed = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = interrupt.cancelled() => {
                println!("{} interrupted: closing early", stamp(t0));
                break;
            }
            r = &mut daemon => {
                daemon_failed = Some(r);
                break;
            }
        }
        let t = t0.elapsed();
        if t >= duration {
            break;
        }
        said.announce(t0, &timeline);
        if t >= timeline.cut_from && t < timeline.cut_to && collector.is_running() {
            println!(
                "{} >>> cutting the upstream link: collector stopped for {}s (the outbox keeps \
                 the batches)",
                stamp(t0),
                (timeline.cut_to - timeline.cut_from).as_secs()
            );
            collector.stop().await?;
        } else if t >= timeline.cut_to && !collector.is_running() {
            collector.restart().await?;
            println!(
                "{} >>> upstream link back: collector restarted on the same port",
                stamp(t0)
            );
        }
        if let Some(s) = fetch_status(&admin).await {
            println!("{} {}", stamp(t0), live_line(&s, &mut last));
        }
    }
    if let Some(r) = daemon_failed {
        sensors_stop.cancel();
        return match r {
            Ok(Ok(())) => bail!("edgeferry stopped unexpectedly"),
            Ok(Err(e)) => Err(anyhow::Error::new(e).context("edgeferry failed")),
            Err(e) => bail!("edgeferry panicked: {e}"),
        };
    }

    // Closing: sensors first, so the published count is final.
    sensors_stop.cancel();
    let mut published = 0;
    let mut unacked = 0;
    let mut last_publish_ms: i64 = 0;
    for (stats, task) in sensors {
        let _ = task.await;
        published += stats.acked.load(Ordering::SeqCst);
        unacked += stats
            .sent
            .load(Ordering::SeqCst)
            .saturating_sub(stats.acked.load(Ordering::SeqCst));
        last_publish_ms = last_publish_ms.max(stats.last_ms.load(Ordering::SeqCst) as i64);
    }
    println!(
        "{} sensors stopped: {published} readings published and PUBACKed{}",
        stamp(t0),
        if unacked > 0 {
            format!(", {unacked} without a PUBACK (not counted)")
        } else {
            String::new()
        }
    );
    if !collector.is_running() {
        collector.restart().await?;
        println!(
            "{} >>> upstream link back: collector restarted on the same port",
            stamp(t0)
        );
    }

    // Every window holding a reading closes at its end + lateness; it reaches the outbox at
    // the next checkpoint and the collector after the linger.
    let longest = *WINDOWS.iter().max().expect("windows") as i64 * 1000;
    let last_end_ms = (last_publish_ms / longest + 1) * longest;
    let due_ms =
        last_end_ms + (LATENESS + CHECKPOINT + LINGER + Duration::from_secs(1)).as_millis() as i64;
    let wait = Duration::from_millis(due_ms.saturating_sub(now_ms()).max(0) as u64);
    println!(
        "{} waiting for the last windows to close and reach the collector (about {}s, at most {}s)",
        stamp(t0),
        wait.as_secs(),
        (wait + SETTLE_TIMEOUT).as_secs()
    );
    let out = collector_dir.join("out");
    let settled = settle(&out, &admin, published, due_ms, &interrupt, t0).await;
    if !settled {
        println!(
            "{} the collector's counts did not reach the published count in time",
            stamp(t0)
        );
    }
    let final_status = fetch_status(&admin).await;

    // Orderly stop: edgeferry, then the collector. The broker ends with the process.
    daemon_stop.cancel();
    let daemon_result = match tokio::time::timeout(crate::daemon::SHUTDOWN_DEADLINE, daemon).await {
        Ok(Ok(r)) => r.map_err(anyhow::Error::new),
        Ok(Err(e)) => Err(anyhow::anyhow!("edgeferry panicked: {e}")),
        Err(_) => Err(anyhow::anyhow!(
            "edgeferry did not stop within {}s",
            crate::daemon::SHUTDOWN_DEADLINE.as_secs()
        )),
    };
    match &daemon_result {
        Ok(()) => println!("{} edgeferry stopped cleanly", stamp(t0)),
        Err(e) => println!("{} edgeferry did not stop cleanly: {e:#}", stamp(t0)),
    }
    collector.stop().await?;
    println!("{} collector stopped", stamp(t0));

    let seen = CollectorView::read(&out);
    let report = closing_report(published, final_status.as_ref(), &seen);
    print!("{}", report.text);
    daemon_result?;
    Ok(report.matched)
}

/// How long past the expected time the demo waits for the collector's counts.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Polls the collector's output until every window length's count equals `published`
/// (true), or until, after `due_ms`, nothing changes any more with an empty backlog and a
/// connected link, or the timeout passes (false).
async fn settle(
    out: &Path,
    admin: &str,
    published: u64,
    due_ms: i64,
    interrupt: &CancellationToken,
    t0: Instant,
) -> bool {
    let hard = Instant::now()
        + Duration::from_millis(due_ms.saturating_sub(now_ms()).max(0) as u64)
        + SETTLE_TIMEOUT;
    let mut last_counts = BTreeMap::new();
    let mut unchanged_since = Instant::now();
    let mut last_print = Instant::now();
    loop {
        let seen = CollectorView::read(out);
        if WINDOWS
            .iter()
            .all(|w| seen.counts.get(w).copied().unwrap_or(0) == published)
        {
            return true;
        }
        if seen.counts != last_counts {
            last_counts = seen.counts.clone();
            unchanged_since = Instant::now();
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            let parts: Vec<String> = WINDOWS
                .iter()
                .map(|w| {
                    format!(
                        "{}/{published} ({w}s windows)",
                        seen.counts.get(w).copied().unwrap_or(0)
                    )
                })
                .collect();
            println!("{} collector has {}", stamp(t0), parts.join(", "));
        }
        if Instant::now() >= hard {
            return false;
        }
        if now_ms() > due_ms && unchanged_since.elapsed() >= Duration::from_secs(3) {
            // Past the expected time and stable: stop early only if nothing is on its way.
            if let Some(s) = fetch_status(admin).await
                && s.backlog.batches == 0
                && s.upstream.as_ref().is_some_and(|u| u.connected)
            {
                return false;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = interrupt.cancelled() => return false,
        }
    }
}

/// The closing report and whether it matched.
struct Report {
    text: String,
    matched: bool,
}

fn closing_report(published: u64, status: Option<&StatusReport>, seen: &CollectorView) -> Report {
    let mut t = String::new();
    let mut matched = published > 0;
    let _ = writeln!(t, "\n== edgeferry demo: closing report ==");
    let _ = writeln!(
        t,
        "readings published by the sensors (PUBACKed)          {published:>8}"
    );
    if let Some(s) = status {
        let _ = writeln!(
            t,
            "readings journaled by edgeferry                        {:>8}  ({} rejected, {} duplicates dropped)",
            s.ingest.readings, s.ingest.rejected, s.ingest.duplicates_dropped
        );
    }
    for w in WINDOWS {
        let n = seen.counts.get(&w).copied().unwrap_or(0);
        let ok = n == published;
        matched &= ok;
        let _ = writeln!(
            t,
            "readings counted at the collector, {w:>2}s windows         {n:>8}  {}",
            if ok { "MATCH" } else { "MISMATCH" }
        );
    }
    let _ = writeln!(
        t,
        "  (sum of count over the highest version of each (series, window_start); {} aggregate lines, {} windows)",
        seen.aggregate_lines, seen.windows
    );
    let raised: u64 = seen
        .alerts
        .iter()
        .filter(|((_, s), _)| s == "raised")
        .map(|(_, n)| n)
        .sum();
    let cleared: u64 = seen
        .alerts
        .iter()
        .filter(|((_, s), _)| s == "cleared")
        .map(|(_, n)| n)
        .sum();
    let _ = writeln!(
        t,
        "alerts seen at the collector: raised {raised}, cleared {cleared}"
    );
    let mut rules: Vec<&String> = seen.alerts.keys().map(|(r, _)| r).collect();
    rules.dedup();
    for rule in rules {
        let get = |state: &str| {
            seen.alerts
                .get(&(rule.clone(), state.to_string()))
                .copied()
                .unwrap_or(0)
        };
        let _ = writeln!(
            t,
            "  {rule:<14} raised {}, cleared {}",
            get("raised"),
            get("cleared")
        );
    }
    let _ = writeln!(t, "RESULT: {}", if matched { "MATCH" } else { "MISMATCH" });
    Report { text: t, matched }
}

/// What the collector wrote, reduced the way a central consumer would.
#[derive(Debug, Default)]
struct CollectorView {
    /// Window length (s) → sum of `count` over the highest version per (series, start).
    counts: BTreeMap<u64, u64>,
    /// (rule, state) → alert lines.
    alerts: BTreeMap<(String, String), u64>,
    aggregate_lines: u64,
    windows: u64,
}

impl CollectorView {
    /// Reads every `*.jsonl` under `out` (a line being written is skipped).
    fn read(out: &Path) -> CollectorView {
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

/// One status line: rates, totals, backlog, link state, alerts.
fn live_line(s: &StatusReport, last: &mut Option<(Instant, u64)>) -> String {
    let now = Instant::now();
    let rate = match *last {
        Some((t, n)) if now > t => {
            s.ingest.readings.saturating_sub(n) as f64 / (now - t).as_secs_f64()
        }
        _ => 0.0,
    };
    *last = Some((now, s.ingest.readings));
    let b = &s.backlog;
    let backlog = if b.batches == 0 {
        "backlog empty".to_string()
    } else {
        format!(
            "backlog {} batches/{} items, oldest {}s",
            b.batches,
            b.items,
            b.oldest_age_secs.unwrap_or(0)
        )
    };
    let upstream = match &s.upstream {
        Some(u) if u.connected => "upstream connected".to_string(),
        Some(_) => "upstream DOWN".to_string(),
        None => "no upstream".to_string(),
    };
    // A (rule, series) pair alternates raised, cleared, ...: raised = cleared + active.
    let raised = (s.process.alerts + s.process.alerts_active) / 2;
    format!(
        "in {rate:>5.1}/s  readings {:>6}  windows out {:>4}  {backlog:<38} {upstream:<18}  alerts raised {raised} (active {})",
        s.ingest.readings, s.process.windows_emitted, s.process.alerts_active
    )
}

/// Announcements of the scripted events, each printed once.
#[derive(Default)]
struct Announced {
    heat: bool,
    peak: bool,
    silent: bool,
}

impl Announced {
    fn announce(&mut self, t0: Instant, tl: &Timeline) {
        let t = t0.elapsed();
        if !self.heat && t >= tl.heat_from {
            self.heat = true;
            println!(
                "{} >>> {}/{} starts overheating (rule overheat: above {OVERHEAT_ABOVE}, clears below {OVERHEAT_CLEAR})",
                stamp(t0),
                HOT.0,
                HOT.1
            );
        }
        if !self.peak && t >= tl.heat_peak {
            self.peak = true;
            println!(
                "{} >>> {}/{} peaks at {OVERHEAT_PEAK} °C and cools down",
                stamp(t0),
                HOT.0,
                HOT.1
            );
        }
        if !self.silent && t >= tl.silent_at {
            self.silent = true;
            println!(
                "{} >>> {}/{} falls silent (rule sensor-silent raises after {}s)",
                stamp(t0),
                SILENT.0,
                SILENT.1,
                SILENT_FOR.as_secs()
            );
        }
    }
}

/// The reference collector, stopped and restarted on the same port and data directory.
struct Collector {
    dir: PathBuf,
    addr: String,
    running: Option<(CancellationToken, JoinHandle<Result<()>>)>,
}

impl Collector {
    async fn start(dir: &Path) -> Result<Collector> {
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

    fn spawn(&mut self) {
        let mut cfg = CollectConfig::new(self.addr.clone(), self.dir.clone());
        cfg.shutdown_timeout = Duration::from_secs(5);
        let stop = CancellationToken::new();
        let task = tokio::spawn(crate::collect::run(cfg, stop.clone()));
        self.running = Some((stop, task));
    }

    /// Fails if the collector task ended (e.g. it could not listen).
    async fn check_alive(&mut self) -> Result<()> {
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

    fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    fn is_running(&self) -> bool {
        self.running.is_some()
    }

    async fn stop(&mut self) -> Result<()> {
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
    async fn restart(&mut self) -> Result<()> {
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

/// The generated gateway configuration (also written to DIR/config.toml for the curious).
fn demo_config(data_dir: &Path, mqtt_url: &str, upstream_url: &str) -> String {
    let windows: Vec<String> = WINDOWS.iter().map(|w| format!("\"{w}s\"")).collect();
    format!(
        r#"# Generated by `edgeferry demo`.
[gateway]
id = "{GATEWAY}"
data_dir = "{data}"

[mqtt]
url = "{mqtt_url}"
client_id = "edgeferry-demo"
commit_interval = "5ms"
reconnect_max = "2s"

[[mqtt.subscribe]]
filter = "sensors/#"
template = "sensors/{{site}}/{{device}}/{{metric}}"
format = "json"
value = "value"
timestamp = "ts"

[process]
windows = [{windows}]
allowed_lateness = "{lateness}ms"
correction_horizon = "30s"
checkpoint_interval = "{checkpoint}ms"

[[rules]]
name = "overheat"
metric = "temperature"
above = {OVERHEAT_ABOVE:.1}
clear_below = {OVERHEAT_CLEAR:.1}
publish = "alerts/{{site}}/{{device}}/{{rule}}"

[[rules]]
name = "sensor-silent"
metric = "temperature"
silent_for = "{silent}s"
publish = "alerts/{{site}}/{{device}}/{{rule}}"

[store]
max_disk = "256MiB"
segment_size = "4MiB"

[upstream]
url = "{upstream_url}"
linger = "{linger}ms"

[admin]
listen = "127.0.0.1:0"
"#,
        data = data_dir.display().to_string().replace('\\', "\\\\"),
        windows = windows.join(", "),
        lateness = LATENESS.as_millis(),
        checkpoint = CHECKPOINT.as_millis(),
        silent = SILENT_FOR.as_secs(),
        linger = LINGER.as_millis(),
    )
}

/// Waits for the admin endpoint and for `ready` (state recovered, subscription acknowledged).
async fn wait_ready(
    data_dir: &Path,
    daemon: &mut JoinHandle<Result<(), crate::daemon::DaemonError>>,
) -> Result<String> {
    let started = Instant::now();
    loop {
        if daemon.is_finished() {
            return match daemon.await {
                Ok(Ok(())) => bail!("edgeferry stopped before it was ready"),
                Ok(Err(e)) => Err(anyhow::Error::new(e).context("edgeferry failed to start")),
                Err(e) => bail!("edgeferry panicked: {e}"),
            };
        }
        let addr = crate::admin::resolve_addr("127.0.0.1:0", data_dir);
        if addr != "127.0.0.1:0"
            && let Some(s) = fetch_status(&addr).await
            && s.ready
        {
            return Ok(addr);
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("edgeferry was not ready within 30 s (see the log)");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `/status` from the admin endpoint, or `None` if it does not answer.
async fn fetch_status(addr: &str) -> Option<StatusReport> {
    let addr = addr.to_string();
    tokio::task::spawn_blocking(move || {
        let (_, body) = crate::admin::http_get(&addr, "/status", Duration::from_secs(2)).ok()?;
        serde_json::from_str(&body).ok()
    })
    .await
    .ok()
    .flatten()
}

/// First Ctrl-C/SIGTERM: close early (with the report); the second: exit at once.
async fn watch_interrupts(interrupt: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    let mut seen = 0;
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        seen += 1;
        if seen == 1 {
            interrupt.cancel();
        } else {
            eprintln!("edgeferry demo: second interrupt, exiting now");
            std::process::exit(2);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Simulated sensors
// ---------------------------------------------------------------------------------------------

struct SensorSpec {
    site: &'static str,
    device: &'static str,
    temp_base: f64,
    hum_base: f64,
    overheats: bool,
    silent_at: Option<Duration>,
}

#[derive(Default)]
struct SensorStats {
    /// Publishes handed to the client.
    sent: AtomicU64,
    /// PUBACKs received.
    acked: AtomicU64,
    /// Event time of the last reading published (epoch ms).
    last_ms: AtomicU64,
}

/// A mean-reverting random walk: realistic sensor noise around `base`.
struct Walk {
    base: f64,
    value: f64,
    step: f64,
}

impl Walk {
    fn new(base: f64, step: f64) -> Walk {
        Walk {
            base,
            value: base + rand::random_range(-step..step) * 5.0,
            step,
        }
    }

    fn next(&mut self) -> f64 {
        self.value += (self.base - self.value) * 0.05 + rand::random_range(-self.step..self.step);
        self.value
    }
}

async fn run_sensor(
    spec: SensorSpec,
    port: u16,
    stats: Arc<SensorStats>,
    timeline: Timeline,
    t0: Instant,
    stop: CancellationToken,
) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut o = MqttOptions::new(
        format!("demo-{}-{}", spec.site, spec.device),
        "127.0.0.1",
        port,
    );
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(o, 256);
    let acks = stats.clone();
    let net_stop = CancellationToken::new();
    let mut net = tokio::spawn({
        let net_stop = net_stop.clone();
        async move {
            loop {
                tokio::select! {
                    ev = eventloop.poll() => match ev {
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            acks.acked.fetch_add(1, Ordering::SeqCst);
                        }
                        // Sent DISCONNECT: done (polling on would reconnect).
                        Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                        Ok(_) => {}
                        Err(e) => {
                            if net_stop.is_cancelled() {
                                return;
                            }
                            tracing::debug!("sensor connection: {e}");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    },
                    _ = net_stop.cancelled() => return,
                }
            }
        }
    });

    let mut temp = Walk::new(spec.temp_base, 0.08);
    let mut hum = Walk::new(spec.hum_base, 0.3);
    // Sensors do not tick in lockstep.
    let phase = Duration::from_millis(rand::random_range(0..PUBLISH_EVERY.as_millis() as u64));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, PUBLISH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let prefix = format!("sensors/{}/{}", spec.site, spec.device);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        let t = t0.elapsed();
        if t >= timeline.duration {
            break;
        }
        if spec.silent_at.is_some_and(|at| t >= at) {
            // Dead battery: nothing more from this device.
            stop.cancelled().await;
            break;
        }
        let mut celsius = temp.next();
        if spec.overheats {
            celsius += timeline.heat(t, spec.temp_base);
        }
        let humidity = hum.next().clamp(0.0, 100.0);
        let ts = now_ms();
        for (metric, value) in [("temperature", celsius), ("humidity", humidity)] {
            let payload = format!(r#"{{"value":{value:.2},"ts":{ts}}}"#);
            if client
                .publish(
                    format!("{prefix}/{metric}"),
                    QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .await
                .is_err()
            {
                break;
            }
            stats.sent.fetch_add(1, Ordering::SeqCst);
        }
        stats.last_ms.fetch_max(ts as u64, Ordering::SeqCst);
    }
    // Wait for the outstanding PUBACKs, so the published count is final.
    let started = Instant::now();
    while stats.acked.load(Ordering::SeqCst) < stats.sent.load(Ordering::SeqCst)
        && started.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = client.disconnect().await;
    if tokio::time::timeout(Duration::from_secs(1), &mut net)
        .await
        .is_err()
    {
        net_stop.cancel();
        let _ = net.await;
    }
}
