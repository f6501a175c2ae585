//! Wiring of the stages, ordered shutdown and systemd integration.
//!
//! Start-up order: open the journal (cutting a torn tail), recover window state from its
//! checkpoint and replay the journal from the checkpoint's position, then connect to the
//! broker. `READY=1` is sent only once state is recovered *and* the broker acknowledged every
//! subscription, so `systemctl start` returning means readings are flowing.
//!
//! Shutdown order (first SIGTERM/SIGINT): stop reading from the broker → commit and
//! acknowledge what was received → processing drains and writes a final checkpoint → exit 0.
//! A second signal, or the deadline passing, exits at once with code 2: everything is
//! crash-safe anyway, the orderly path only saves replay work.

pub mod reload;

use crate::config::Config;
use crate::ingest::{self, IngestStatus};
use crate::process::{ProcessLimits, ProcessShared, ProcessStatus, Processor};
use crate::store::journal::Journal;
use crate::store::outbox::Outbox;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long an orderly shutdown may take before edgeferry exits anyway.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(20);

/// Why the daemon stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The data directory is unusable.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// `[gateway] data_dir` as configured, shown so the operator knows which path to fix.
        path: String,
        /// The operating system's reason it could not be created (permission denied, read-only
        /// file system, ...).
        source: std::io::Error,
    },
    /// The journal or outbox could not be opened, recovered or read at start-up (or by
    /// `dump-journal`); the daemon stops before taking any readings.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The store epoch could not be read or made.
    #[error(transparent)]
    Epoch(#[from] crate::store::epoch::EpochError),
    /// Ingest stopped with an error (unusable broker URL, TLS or password file, or a journal
    /// failure); the other stages are then stopped in the same orderly way.
    #[error(transparent)]
    Ingest(#[from] crate::ingest::IngestError),
    /// Processing could not write its checkpoint, replay the journal or write the outbox.
    #[error(transparent)]
    Process(#[from] crate::process::ProcessError),
    /// The embedded MQTT broker did not start.
    #[error(transparent)]
    #[cfg(feature = "embedded-broker")]
    EmbeddedBroker(#[from] crate::ingest::embedded::EmbeddedError),
    /// The SIGHUP handler (configuration reload) could not be installed.
    #[error("cannot install the SIGHUP handler: {0}")]
    Signal(std::io::Error),
    /// The admin endpoint could not listen.
    #[error("admin.listen {addr}: {source}")]
    Admin {
        /// `[admin] listen` as configured, so the operator sees which setting to change.
        addr: String,
        /// The operating system's reason binding failed (address in use, permission denied, ...).
        /// A data directory that refuses `admin.addr` is not fatal: see
        /// [`crate::admin::record_addr_until_done`].
        source: std::io::Error,
    },
}

/// First SIGTERM/SIGINT cancels `shutdown`; a second one exits immediately (code 2).
pub async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
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
            tracing::info!("shutting down (send the signal again to force)");
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
            shutdown.cancel();
            let deadline = shutdown.clone();
            tokio::spawn(async move {
                let _ = deadline;
                tokio::time::sleep(SHUTDOWN_DEADLINE).await;
                tracing::error!("orderly shutdown exceeded {SHUTDOWN_DEADLINE:?}; exiting");
                std::process::exit(2);
            });
        } else {
            tracing::warn!("second signal: exiting now");
            std::process::exit(2);
        }
    }
}

/// How often a read-only data directory is looked at again.
const READ_ONLY_RETRY: Duration = Duration::from_secs(5);

/// Waits while `dir` is on a file system mounted read-only; `false` when shutdown came first.
///
/// The kernel remounts ext4 read-only after an I/O error, and an SD card's controller can lock
/// itself read-only; until someone repairs or remounts it, no journal can be opened there. An
/// exit would make systemd restart edgeferry over and over (and flood the log); instead it
/// says once what is wrong and what to do, keeps the watchdog fed, looks again every few
/// seconds and starts as soon as the directory takes writes. Nothing is taken from the broker
/// meanwhile: it keeps the readings in edgeferry's session.
///
/// `access(2)` answers without writing anything (no flash wear for the check). A full or
/// failing disk is not waited for here: the stores open on it, and their writes are retried.
async fn wait_until_writable(
    dir: &std::path::Path,
    waiting: &watch::Sender<Option<String>>,
    shutdown: &CancellationToken,
) -> bool {
    let read_only = || {
        use std::os::unix::ffi::OsStrExt;
        let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
            return false;
        };
        // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
        let r = unsafe { libc::access(c.as_ptr(), libc::W_OK) };
        r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EROFS)
    };
    if !read_only() {
        return true;
    }
    let since = std::time::Instant::now();
    tracing::error!(
        "the data directory {} is on a read-only file system (os error 30): waiting for it to \
         take writes (retrying every {READ_ONLY_RETRY:?}); nothing is taken from the broker \
         meanwhile. Check the disk (dmesg) and remount it read-write, or set gateway.data_dir \
         to a writable directory",
        dir.display()
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(
        "waiting: the data directory is read-only",
    )]);
    metrics::gauge!("edgeferry_store_waiting").set(1.0);
    waiting.send_replace(Some(format!(
        "the data directory {} is on a read-only file system: remount it read-write or set \
         gateway.data_dir to a writable directory",
        dir.display()
    )));
    loop {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        tokio::select! {
            _ = tokio::time::sleep(READ_ONLY_RETRY) => {}
            _ = shutdown.cancelled() => return false,
        }
        if !read_only() {
            metrics::gauge!("edgeferry_store_waiting").set(0.0);
            waiting.send_replace(None);
            tracing::info!(
                "the data directory {} takes writes again after {:?}: starting",
                dir.display(),
                since.elapsed()
            );
            return true;
        }
    }
}

/// What the daemon opens in its data directory before it takes any reading.
struct Stores {
    journal: Journal,
    epoch: u64,
    outbox: Outbox,
}

/// Opens the journal, the store epoch and the outbox.
fn open_stores(cfg: &Config) -> Result<Stores, DaemonError> {
    let data_dir = &cfg.gateway.data_dir;
    let (journal, rec) = Journal::open(&data_dir.join("journal"), cfg.store.segment_bytes())?;
    log_recovery("journal", &rec);
    tracing::info!(
        first_lsn = rec.first_lsn,
        next_lsn = rec.next_lsn,
        "journal open at {}",
        data_dir.join("journal").display()
    );
    let epoch = crate::store::epoch::load_or_create(data_dir)?;
    let (outbox, recs) = Outbox::open(&data_dir.join("outbox"), cfg.store.segment_bytes())
        .map_err(crate::store::StoreError::from)?;
    log_recovery("outbox aggregates lane", &recs[0]);
    log_recovery("outbox alerts lane", &recs[1]);
    Ok(Stores {
        journal,
        epoch,
        outbox,
    })
}

/// How often stores that could not be opened for a disk fault are tried again.
const OPEN_RETRY: Duration = Duration::from_secs(5);

/// [`open_stores`], waiting out a disk that refuses the writes opening needs (a new data
/// directory's first segment or epoch on a full disk, a failing disk); `None` when shutdown
/// came first. As with a read-only directory, an exit would only make systemd restart
/// edgeferry over and over: it says once what is wrong, keeps the watchdog fed and tries
/// again every few seconds. Any other error (a store locked by another process, ...) ends the
/// daemon as before.
async fn open_stores_patiently(
    cfg: &Config,
    waiting: &watch::Sender<Option<String>>,
    shutdown: &CancellationToken,
) -> Result<Option<Stores>, DaemonError> {
    let since = std::time::Instant::now();
    let mut said = false;
    loop {
        let e = match open_stores(cfg) {
            Ok(stores) => {
                if said {
                    metrics::gauge!("edgeferry_store_waiting").set(0.0);
                    waiting.send_replace(None);
                    tracing::info!(
                        "the data directory takes writes again after {:?}: starting",
                        since.elapsed()
                    );
                }
                return Ok(Some(stores));
            }
            Err(e) if crate::store::is_disk_fault(&e) => e,
            Err(e) => return Err(e),
        };
        if !said {
            said = true;
            tracing::error!(
                "cannot open the stores in {}: {e}; waiting for the disk (retrying every \
                 {OPEN_RETRY:?}); nothing is taken from the broker meanwhile. Free space in \
                 gateway.data_dir or check the disk (dmesg)",
                cfg.gateway.data_dir.display()
            );
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(
                "waiting: the data directory refuses writes",
            )]);
            metrics::gauge!("edgeferry_store_waiting").set(1.0);
            waiting.send_replace(Some(format!(
                "cannot open the stores in {}: {e}: free space there or check the disk (dmesg)",
                cfg.gateway.data_dir.display()
            )));
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        tokio::select! {
            _ = tokio::time::sleep(OPEN_RETRY) => {}
            _ = shutdown.cancelled() => return Ok(None),
        }
    }
}

/// Runs the daemon until `shutdown` is cancelled.
///
/// With `reload_from`, a SIGHUP reads that file again and applies what can change while the
/// daemon runs ([`reload`]); its handler is installed first thing, so that a reload asked for
/// during start-up waits instead of killing the process (SIGHUP's default action).
pub async fn run(
    cfg: Config,
    reload_from: Option<PathBuf>,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let hangups = match &reload_from {
        Some(_) => Some(
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .map_err(DaemonError::Signal)?,
        ),
        None => None,
    };
    let prometheus = crate::admin::prometheus();
    for w in cfg.warnings() {
        tracing::warn!("{w}");
    }
    let started = std::time::Instant::now();
    let data_dir = cfg.gateway.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|source| DaemonError::DataDir {
        path: data_dir.display().to_string(),
        source,
    })?;
    // The admin endpoint listens first, so that `edgeferry status` can say why the daemon is
    // waiting for its data directory, if it must (the full endpoint takes the socket over).
    let admin_err = |source| DaemonError::Admin {
        addr: cfg.admin.listen.clone(),
        source,
    };
    let admin_listener = tokio::net::TcpListener::bind(&cfg.admin.listen)
        .await
        .map_err(admin_err)?;
    let bound = admin_listener.local_addr().map_err(admin_err)?;
    let admin_listener = admin_listener.into_std().map_err(admin_err)?;
    tracing::info!(
        "admin listening on {bound} (/ dashboard, /live, /metrics, /status, /healthz, /readyz)"
    );
    let admin_stop = shutdown.child_token();
    let addr_task = tokio::spawn(crate::admin::record_addr_until_done(
        data_dir.clone(),
        bound,
        admin_stop.clone(),
    ));
    let (waiting_tx, waiting_rx) = watch::channel(None);
    let stop_waiting = shutdown.child_token();
    let waiting_endpoint = tokio::spawn(crate::admin::serve_waiting(
        tokio::net::TcpListener::from_std(admin_listener.try_clone().map_err(admin_err)?)
            .map_err(admin_err)?,
        waiting_rx,
        prometheus.clone(),
        stop_waiting.clone(),
    ));
    let opened = async {
        if !wait_until_writable(&data_dir, &waiting_tx, &shutdown).await {
            return Ok(None);
        }
        open_stores_patiently(&cfg, &waiting_tx, &shutdown).await
    }
    .await;
    stop_waiting.cancel();
    let _ = waiting_endpoint.await;
    let stores = match opened {
        Ok(Some(stores)) => stores,
        done => {
            addr_task.abort();
            return done.map(|_| ());
        }
    };
    let Stores {
        journal,
        epoch,
        outbox,
    } = stores;
    let outbox = Arc::new(Mutex::new(outbox));
    let (watermark_tx, watermark_rx) = watch::channel([0u64, 0u64]);
    let pstatus = Arc::new(ProcessStatus::default());
    // The live feed (admin `/live`): sampled readings from the committer, windows and alerts
    // from processing. Created before replay, which has no listeners and so sends nothing.
    let live = crate::live::LiveFeed::default();
    let trim_to = Arc::new(AtomicU64::new(0));
    let journal_bytes = Arc::new(AtomicU64::new(journal.disk_bytes()));
    let status = Arc::new(IngestStatus::default());
    let ingest_live = {
        let s = status.clone();
        Arc::new(move || {
            s.connected.load(Ordering::Relaxed)
                && s.subscribed.load(Ordering::Relaxed)
                && s.journal_error().is_none()
        }) as Arc<dyn Fn() -> bool + Send + Sync>
    };
    let clock = Arc::new(crate::clock::GatewayClock::system(&cfg.clock));
    // The processor holds the only watermark sender: when it stops, the link sees the end.
    let shared = ProcessShared {
        outbox: outbox.clone(),
        watermark: watermark_tx,
        trim_to: trim_to.clone(),
        journal_bytes: journal_bytes.clone(),
        status: pstatus.clone(),
        input_live: Some(ingest_live),
        input_disk_full: Some({
            let s = status.clone();
            Arc::new(move || s.journal_full.load(Ordering::Relaxed))
        }),
        live: Some(live.clone()),
        clock: clock.clone(),
    };
    let limits = ProcessLimits {
        batch_max: cfg.upstream.as_ref().map(|u| u.batch_max).unwrap_or(500),
        linger: cfg
            .upstream
            .as_ref()
            .map(|u| u.linger)
            .unwrap_or(Duration::from_secs(1)),
        store: cfg.store.clone(),
    };
    let mut processor = Processor::open(
        &cfg.process,
        &cfg.rules,
        limits,
        &data_dir.join("state"),
        shared,
    )?;
    let (pub_tx, pub_rx) = mpsc::channel(1024);
    processor.set_publications(pub_tx);
    // Configuration reloads: a change at a time, each answered before the next is sent.
    let (process_changes, process_changes_rx) = mpsc::channel(1);
    processor.set_changes(process_changes_rx);
    let (subscription_changes, subscription_changes_rx) = mpsc::channel(1);
    let replayed = processor.replay(&journal)?;
    tracing::info!(replayed, checkpoint_lsn = processor.checkpoint_lsn(), epoch = %format!("{epoch:016x}"), "state recovered");
    // Sources the Sparkplug B decoder holds as dead (a node's file is written before its
    // death is acknowledged): their silence alerts, should replay not have raised them.
    let sparkplug = crate::ingest::decode::sparkplug::SparkplugState::load(
        &data_dir
            .join("state")
            .join(crate::ingest::decode::sparkplug::STATE_DIR),
        cfg.process.max_series,
    );
    for tags in sparkplug.offline_sources() {
        processor.mark_offline(&crate::model::Offline { tags, after: 0 });
    }
    let known_series = processor.known_series();
    // Arrival times go on from the latest one recorded, even if the wall clock is behind it.
    clock.raise_floor(processor.arrival_clock_ms());

    // The embedded broker (if any) runs until the process exits: rumqttd has no shutdown.
    #[cfg(feature = "embedded-broker")]
    if let Some(listen) = cfg.mqtt.embedded_broker.clone() {
        tokio::task::spawn_blocking(move || {
            crate::ingest::embedded::EmbeddedBroker::start(&listen)
        })
        .await
        .expect("embedded broker start-up panicked")?;
    }

    // Monotonic: a wall-clock step must neither fake a stall nor hide one.
    let progress = Arc::new(AtomicU64::new(crate::clock::mono_ms() as u64));
    // Committed records go to processing one commit group per message; a few groups in
    // flight (each at most `mqtt.commit_max` records).
    let (tx, rx) = mpsc::channel(4);
    let (ready_tx, mut ready_rx) = watch::channel(false);
    let forward_status = Arc::new(crate::forward::ForwardStatus::default());

    // Every task is tracked; the one `shutdown` token starts the ordered stop (see
    // docs/ARCHITECTURE.md): ingest drains and stops, which closes processing's input;
    // processing writes its final checkpoint and stops, which closes the link's watermark;
    // the link sends what that checkpoint covers (at most forward::link::DRAIN_FOR) and stops.
    let tasks = TaskTracker::new();
    let proc_task = tasks.spawn(processor.run(rx));

    let ingest_task = tasks.spawn(ingest::run(
        cfg.mqtt.clone(),
        cfg.client_id(),
        ingest::session::IngestParams {
            max_series: cfg.process.max_series,
            known_series,
            trim_to,
            journal_bytes,
            blocked: pstatus.blocked.clone(),
            live: Some(live.clone()),
            clock: clock.clone(),
            state_dir: Some(data_dir.join("state")),
            subscription_changes: Some(subscription_changes_rx),
        },
        journal,
        tx,
        pub_rx,
        status.clone(),
        ready_tx,
        progress.clone(),
        shutdown.clone(),
    ));

    tasks.spawn(async move {
        let _ = addr_task.await;
    });
    let disk_writes = Arc::new(crate::store::wear::WriteRate::default());
    tasks.spawn(crate::store::wear::run_sampler(
        disk_writes.clone(),
        shutdown.clone(),
    ));
    let (shown_upstream, shown_upstream_rx) = watch::channel(None);
    let admin = crate::admin::Admin {
        gateway: cfg.gateway.id.clone(),
        broker_url: cfg.mqtt.url.clone(),
        ingest: status.clone(),
        ready: ready_rx.clone(),
        started,
        prometheus,
        process: pstatus.clone(),
        outbox: outbox.clone(),
        upstream: shown_upstream_rx,
        live: live.clone(),
        clock: clock.clone(),
        disk_writes: disk_writes.clone(),
        endurance: cfg.store.endurance.map(|e| e.as_u64()),
    };
    tasks.spawn(crate::admin::serve(
        tokio::net::TcpListener::from_std(admin_listener).map_err(admin_err)?,
        admin.clone(),
        admin_stop.clone(),
    ));
    let admin_slot = reload::AdminSlot {
        admin,
        data_dir: data_dir.clone(),
        shutdown: shutdown.clone(),
        tasks: tasks.clone(),
        stop: admin_stop,
    };

    // The upstream link stops when processing has stopped (its watermark channel closes),
    // or when a reload replaces it.
    let mut upstream = reload::UpstreamSlot {
        gateway: cfg.gateway.id.clone(),
        data_dir: data_dir.clone(),
        outbox: outbox.clone(),
        watermark: watermark_rx,
        status: forward_status.clone(),
        health: {
            let broker = status.clone();
            Arc::new(move || crate::protocol::Health {
                time_ms: crate::clock::now_ms(),
                uptime_secs: started.elapsed().as_secs(),
                backlog_batches: 0,
                backlog_bytes: 0,
                oldest_secs: None,
                broker_connected: broker.connected.load(Ordering::Relaxed),
                software: format!("edgeferry/{}", env!("CARGO_PKG_VERSION")),
            })
        },
        shown: shown_upstream,
        tasks: tasks.clone(),
        running: None,
    };
    upstream.start(cfg.upstream.clone(), epoch);
    if let (Some(path), Some(hangups)) = (reload_from, hangups) {
        let reloader = reload::Reloader {
            path,
            current: cfg.clone(),
            process: process_changes,
            subscriptions: subscription_changes,
            admin: admin_slot,
            upstream,
        };
        tasks.spawn(reloader.run(hangups, ready_rx.clone(), shutdown.clone()));
    }

    tasks.spawn(systemd_loop(status.clone(), progress, shutdown.clone()));
    tasks.close();
    tokio::select! {
        _ = ready_rx.wait_for(|r| *r) => {
            tracing::info!("ready: state recovered and subscriptions acknowledged");
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        }
        _ = shutdown.cancelled() => {}
    }

    let ingest_result = ingest_task.await.expect("ingest task panicked");
    if ingest_result.is_err() {
        // Ingest failed (the journal): stop everything else the same orderly way.
        shutdown.cancel();
    }
    let proc_result = proc_task.await.expect("processing task panicked");
    tasks.wait().await;
    let _journal = ingest_result?;
    proc_result?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Says what opening a segment log repaired: a cut torn tail is routine after a crash (warn);
/// quarantined bytes mean damaged data and are logged as an error with where they went.
fn log_recovery(what: &str, rec: &crate::store::seglog::Recovery) {
    if !rec.quarantined.is_empty() {
        let moved: Vec<String> = rec
            .quarantined
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        tracing::error!(
            truncated_bytes = rec.truncated_bytes,
            quarantined_bytes = rec.quarantined_bytes,
            records_kept = rec.records,
            "{what} was damaged: salvaged the valid records and moved the damaged bytes to \
             quarantine: {} (inspect with `edgeferry store verify`)",
            moved.join(", ")
        );
    } else if rec.truncated_bytes > 0 {
        tracing::warn!(
            truncated_bytes = rec.truncated_bytes,
            "{what} recovered after an unclean stop (cut a torn tail)"
        );
    }
}

/// Sends `WATCHDOG=1` only while the commit loop makes progress (it ticks at least once a
/// second even when idle), so a stalled pipeline is restarted by systemd; and a short
/// `STATUS=` line every few seconds.
async fn systemd_loop(
    status: Arc<IngestStatus>,
    progress: Arc<AtomicU64>,
    shutdown: CancellationToken,
) {
    let wd = sd_notify::watchdog_enabled();
    let watchdog = wd.is_some();
    let period = wd
        .map(|d| (d / 2).max(Duration::from_millis(100)))
        .unwrap_or(Duration::from_secs(5));
    // The commit loop ticks every second even when idle; twice that without a tick is a stall.
    let stale_after = wd.map(|d| d.as_millis() as u64 / 2).unwrap_or(u64::MAX);
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let now = crate::clock::mono_ms() as u64;
        let last = progress.load(Ordering::Relaxed);
        if watchdog && now.saturating_sub(last) < stale_after.max(2000) {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        } else if watchdog {
            tracing::error!(
                "commit loop stalled for {} ms; withholding the watchdog ping",
                now - last
            );
        }
        let line = format!(
            "{} broker, {} readings, {} rejected, {} duplicates dropped",
            if status.connected.load(Ordering::Relaxed) {
                "connected to"
            } else {
                "waiting for"
            },
            IngestStatus::get(&status.readings),
            IngestStatus::get(&status.rejected),
            IngestStatus::get(&status.duplicates),
        );
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&line)]);
    }
}

/// Writes every journal record as one JSON line: `{"lsn":..,"received_ms":..,"readings":[..]}`.
pub fn dump_journal(cfg: &Config, out: &mut dyn std::io::Write) -> Result<(), DaemonError> {
    let (journal, _) = Journal::open(
        &cfg.gateway.data_dir.join("journal"),
        cfg.store.segment_bytes(),
    )?;
    for r in journal.read_from(journal.first_lsn())? {
        let (lsn, e) = r?;
        let line = serde_json::json!({
            "lsn": lsn,
            "received_ms": e.received_ms,
            "pkid": e.dedup.pkid,
            "readings": e.readings,
        });
        let _ = writeln!(out, "{line}");
    }
    Ok(())
}
