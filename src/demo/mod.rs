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

mod collector;
mod report;
mod scenario;
mod sensors;

use crate::clock::now_ms;
use crate::ingest::embedded::EmbeddedBroker;
use crate::model::StatusReport;
use anyhow::{Context, Result, bail};
use collector::{Collector, CollectorView};
use report::{closing_report, live_line};
use scenario::*;
use sensors::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
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
    let filter = crate::telemetry::effective_filter(&crate::telemetry::LogConfig::default());
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
                    tracing_subscriber::filter::Targets::new()
                        .with_default(tracing_subscriber::filter::LevelFilter::ERROR),
                )),
        )
        .try_init();
    Ok(())
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
        tokio::spawn(crate::daemon::run(cfg, None, daemon_stop.clone()));

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
