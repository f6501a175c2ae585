//! Local processing: windowed aggregates per series, checkpointed with the journal position.
//!
//! Readings arrive as [`Committed`](crate::ingest::Committed) journal records. The processor
//! folds them into tumbling windows ([`window`]), whose statistics ([`aggregate`]) include a
//! mergeable quantile sketch ([`sketch`]). Its whole state is checkpointed atomically together
//! with the journal position it reflects; on start the journal is replayed from that
//! position, so every reading is applied exactly once to the windows whatever crashed when.
//!
//! The processing clock is the journal's: a record is applied with `now` = its arrival time,
//! which makes replay after a crash see the same lateness decisions as the live run did.
//! Idle periods advance the clock from the wall clock so windows still close without traffic.

pub mod aggregate;
pub mod config;
pub mod sketch;
pub mod window;

pub use config::{ProcessConfig, RuleConfig};

use crate::ingest::Committed;
use crate::store::journal::Journal;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use window::{WindowAggregate, WindowSpec, Windows};

/// Errors of the processing stage.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The state directory or checkpoint file could not be written.
    #[error("checkpoint {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The journal could not be replayed.
    #[error("replaying the journal: {0}")]
    Replay(#[from] crate::store::StoreError),
}

/// What is checkpointed: the window state and the journal position it reflects.
#[derive(Debug, Serialize, Deserialize)]
struct Checkpoint {
    /// Every journal record below this lsn is reflected in `windows`.
    applied_lsn: u64,
    /// The processing clock (ms since epoch).
    clock_ms: i64,
    /// Window state.
    windows: Windows,
}

const CHECKPOINT_MAGIC: &[u8; 4] = b"EFCK";
const CHECKPOINT_VERSION: u16 = 1;

/// The processing stage.
pub struct Processor {
    cfg: ProcessConfig,
    path: PathBuf,
    state: Checkpoint,
    /// lsn covered by the last checkpoint on disk: the journal may be trimmed below it.
    trim_to: Arc<AtomicU64>,
    dirty: bool,
    emitted: Vec<WindowAggregate>,
}

impl Processor {
    /// Loads the checkpoint from `state_dir` (a fresh state when there is none; a damaged
    /// one is moved aside with an error log, and the journal is replayed from its start).
    pub fn open(cfg: &ProcessConfig, state_dir: &Path) -> Result<Processor, ProcessError> {
        std::fs::create_dir_all(state_dir).map_err(|source| ProcessError::Io {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let path = state_dir.join("checkpoint.bin");
        let spec = WindowSpec {
            lengths_secs: cfg.windows.iter().map(|w| w.as_secs() as u32).collect(),
            allowed_lateness_ms: cfg.allowed_lateness.as_millis() as i64,
            retention_ms: cfg.correction_horizon.as_millis() as i64,
        };
        let fresh = || Checkpoint {
            applied_lsn: 0,
            clock_ms: 0,
            windows: Windows::new(spec.clone()),
        };
        let state = match std::fs::read(&path) {
            Ok(bytes) => match decode_checkpoint(&bytes) {
                Ok(c) if c.windows.spec() == &spec => c,
                Ok(_) => {
                    tracing::warn!(
                        "window configuration changed since the last checkpoint; \
                         rebuilding window state from the journal"
                    );
                    fresh()
                }
                Err(why) => {
                    let aside =
                        state_dir.join(format!("checkpoint.bin.bad-{}", crate::ingest::now_ms()));
                    let _ = std::fs::rename(&path, &aside);
                    tracing::error!(
                        "checkpoint {} is damaged ({why}); moved to {} and rebuilding from the journal",
                        path.display(),
                        aside.display()
                    );
                    fresh()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => fresh(),
            Err(source) => return Err(ProcessError::Io { path, source }),
        };
        let trim_to = Arc::new(AtomicU64::new(state.applied_lsn));
        Ok(Processor {
            cfg: cfg.clone(),
            path,
            state,
            trim_to,
            dirty: false,
            emitted: Vec::new(),
        })
    }

    /// The journal position the checkpoint reflects.
    pub fn checkpoint_lsn(&self) -> u64 {
        self.state.applied_lsn
    }

    /// Where the processor publishes how far the journal may be trimmed.
    pub fn trim_handle(&self) -> Arc<AtomicU64> {
        self.trim_to.clone()
    }

    /// Number of series with open or retained windows.
    pub fn series_count(&self) -> usize {
        self.state.windows.series_count()
    }

    /// Applies every journal record from the checkpoint on. Returns how many were applied.
    pub fn replay(&mut self, journal: &Journal) -> Result<u64, ProcessError> {
        let mut n = 0;
        let from = self.state.applied_lsn.max(journal.first_lsn());
        if from > self.state.applied_lsn {
            tracing::warn!(
                checkpoint = self.state.applied_lsn,
                first = journal.first_lsn(),
                "journal starts after the checkpoint position; the records in between are gone"
            );
        }
        for r in journal.read_from(from)? {
            match r {
                Ok((lsn, entry)) => {
                    self.apply(&Committed { lsn, entry });
                    n += 1;
                }
                Err(e) => {
                    metrics::counter!("edgeferry_journal_undecodable_total").increment(1);
                    tracing::error!("skipping journal record: {e}");
                }
            }
        }
        if n > 0 {
            self.checkpoint()?;
        }
        Ok(n)
    }

    /// Folds one committed record into the windows.
    pub fn apply(&mut self, c: &Committed) {
        if c.lsn < self.state.applied_lsn {
            return; // already reflected (replay overlap)
        }
        self.state.clock_ms = self.state.clock_ms.max(c.entry.received_ms);
        let now = self.state.clock_ms;
        for r in &c.entry.readings {
            let key = r.series_key();
            match self.state.windows.apply(&key, r.value, r.time_ms, now) {
                window::Applied::TooLate => {
                    metrics::counter!("edgeferry_process_too_late_total").increment(1)
                }
                window::Applied::Correction => {
                    metrics::counter!("edgeferry_process_late_corrections_total").increment(1)
                }
                _ => {}
            }
        }
        self.state.applied_lsn = c.lsn + 1;
        self.dirty = true;
        self.close_due(now);
    }

    fn close_due(&mut self, now: i64) {
        let before = self.emitted.len();
        self.state.windows.close_due(now, &mut self.emitted);
        let n = self.emitted.len() - before;
        if n > 0 {
            metrics::counter!("edgeferry_process_windows_emitted_total").increment(n as u64);
            self.dirty = true;
        }
    }

    /// Closed windows emitted since the last call (the forwarder's input).
    pub fn take_emitted(&mut self) -> Vec<WindowAggregate> {
        std::mem::take(&mut self.emitted)
    }

    /// Writes the checkpoint atomically (temp file, fsync, rename, fsync directory), then
    /// lets the journal be trimmed below the position it reflects.
    pub fn checkpoint(&mut self) -> Result<(), ProcessError> {
        let body = postcard::to_stdvec(&self.state).expect("window state always encodes");
        crate::util::write_framed(&self.path, CHECKPOINT_MAGIC, CHECKPOINT_VERSION, &body)
            .map_err(|source| ProcessError::Io {
                path: self.path.clone(),
                source,
            })?;
        metrics::gauge!("edgeferry_checkpoint_bytes").set(body.len() as f64);
        self.trim_to
            .store(self.state.applied_lsn, Ordering::Release);
        self.dirty = false;
        Ok(())
    }

    /// Runs until the channel closes (ingest finished) or `shutdown`, checkpointing every
    /// `checkpoint_interval` while something changed, and once more at the end.
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<Committed>,
        shutdown: CancellationToken,
    ) -> Result<(), ProcessError> {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_checkpoint = Instant::now();
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(c) => {
                        let age = crate::ingest::now_ms() - c.entry.received_ms;
                        metrics::histogram!("edgeferry_process_lag_seconds").record(age.max(0) as f64 / 1000.0);
                        if age > self.cfg.budget.as_millis() as i64 {
                            metrics::counter!("edgeferry_budget_violations_total").increment(1);
                        }
                        self.apply(&c);
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    // Idle: let the wall clock close windows (never moving the clock back).
                    let now = crate::ingest::now_ms();
                    if now > self.state.clock_ms {
                        self.state.clock_ms = now;
                        self.close_due(now);
                    }
                }
                _ = shutdown.cancelled() => break,
            }
            for w in self.take_emitted() {
                tracing::debug!(
                    series = %w.series, start = w.window_start_ms, secs = w.window_secs,
                    version = w.version, count = w.agg.count(), "window closed"
                );
            }
            if self.dirty && last_checkpoint.elapsed() >= self.cfg.checkpoint_interval {
                tokio::task::block_in_place(|| self.checkpoint())?;
                last_checkpoint = Instant::now();
            }
        }
        if self.dirty {
            self.checkpoint()?;
        }
        Ok(())
    }
}

fn decode_checkpoint(bytes: &[u8]) -> Result<Checkpoint, String> {
    let body = crate::util::read_framed(bytes, CHECKPOINT_MAGIC, CHECKPOINT_VERSION)?;
    postcard::from_bytes(body).map_err(|e| e.to_string())
}
