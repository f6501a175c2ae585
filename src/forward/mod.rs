//! Forwarding to the central system: what the outbox stores ([`batch`]) and the link.

pub mod batch;
pub mod config;

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
    /// Why the link is down, when it is.
    pub last_error: Mutex<Option<String>>,
}

impl ForwardStatus {
    /// Sets or clears the last error.
    pub fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = e;
    }

    /// The last error.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
