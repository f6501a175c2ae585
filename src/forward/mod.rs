//! Forwarding to the central system: the outbox batches ([`crate::model::batch`]) in the wire
//! protocol ([`crate::protocol`], specified in docs/PROTOCOL.md) over one link core ([`link`])
//! with two transports: WebSocket(+TLS) ([`ws`]) and MQTT ([`mqtt`]).

pub mod config;
pub mod link;
pub mod mqtt;
pub mod ws;

pub use config::UpstreamConfig;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64};

/// Live state of the upstream link, shared with status.
#[derive(Debug, Default)]
pub struct ForwardStatus {
    /// Handshake done, batches flowing.
    pub connected: AtomicBool,
    /// Batches sent (including resends).
    pub batches_sent: AtomicU64,
    /// Batches acknowledged by the central side.
    pub batches_acked: AtomicU64,
    /// Connection attempts that failed or links that broke.
    pub reconnects: AtomicU64,
    /// Moves from one of `[upstream] url` to the next.
    pub switches: AtomicU64,
    /// The URL in use (or being tried); empty before the link starts.
    pub url: Mutex<String>,
    /// Why the link is down, when it is.
    pub last_error: Mutex<Option<String>>,
}

impl ForwardStatus {
    /// Sets or clears the last error.
    pub fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = e;
    }

    /// Records a broken link (state, error, reconnect count) and logs it once per distinct
    /// failure, not once per attempt; `last_logged` is the link's memory of what it logged.
    pub fn link_down(&self, url: &str, msg: String, last_logged: &mut Option<String>) {
        self.connected
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.reconnects
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = crate::telemetry::failure_key(&msg);
        if last_logged.as_deref() != Some(&key) {
            tracing::warn!("upstream {url} link down: {msg}; retrying with backoff");
            *last_logged = Some(key);
        }
        self.set_error(Some(msg));
    }

    /// Records the URL in use.
    pub fn set_url(&self, url: &str) {
        url.clone_into(&mut self.url.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// The URL in use, `None` before the link starts.
    pub fn url(&self) -> Option<String> {
        let u = self.url.lock().unwrap_or_else(|e| e.into_inner());
        (!u.is_empty()).then(|| u.clone())
    }

    /// Why the link last went down; `None` while connected and before the first failure.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

use crate::store::outbox::{Lane, Outbox, StoredBatch, lane_lsn};
use std::sync::Arc;

/// Why a link could not hand out the next batch.
pub type OutboxResult<T> = Result<T, crate::store::seglog::LogError>;

/// Per-connection send positions (lsns) per lane (index 0 aggregates, 1 alerts).
///
/// "Live first": what the processor checkpoints after the connection started is sent before
/// the backlog; the backlog drains oldest first with the capacity left. Nothing waits for new
/// traffic to start the drain.
#[derive(Debug, Clone)]
pub struct Cursors {
    backlog: [u64; 2],
    live: [u64; 2],
    live_start: [u64; 2],
}

impl Cursors {
    /// Cursors for a connection that starts when the checkpointed watermark is `live_start`.
    pub fn new(live_start: [u64; 2]) -> Self {
        Self {
            backlog: [0, 0],
            live: live_start,
            live_start,
        }
    }
}

/// The next unacknowledged batch to send below the watermark `wm`: alerts first, then live
/// aggregates, then the aggregate backlog.
pub fn next_batch(
    outbox: &Arc<Mutex<Outbox>>,
    c: &mut Cursors,
    wm: [u64; 2],
) -> OutboxResult<Option<StoredBatch>> {
    let ob = outbox.lock().unwrap_or_else(|e| e.into_inner());
    let order = [
        (Lane::Alerts, true),
        (Lane::Alerts, false),
        (Lane::Aggregates, true),
        (Lane::Aggregates, false),
    ];
    for (lane, live) in order {
        let i = lane as usize;
        let (from, below) = if live {
            (c.live[i], wm[i])
        } else {
            (c.backlog[i], c.live_start[i].min(wm[i]))
        };
        if let Some(b) = ob.unacked(lane, from, below, 1)?.into_iter().next() {
            let next = lane_lsn(b.seq).1 + 1;
            if live {
                c.live[i] = next;
            } else {
                c.backlog[i] = next;
            }
            return Ok(Some(b));
        }
        // Nothing left in this range: remember so it is not scanned again.
        if live {
            c.live[i] = c.live[i].max(below);
        } else {
            c.backlog[i] = c.backlog[i].max(below);
        }
    }
    Ok(None)
}
