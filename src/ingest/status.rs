//! Live counters and state of ingest: written by the poll task and the committer, read by
//! `/status`, `/metrics` and the systemd status line.

use crate::model::RejectedMessage;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

/// Live counters and state of ingest, shared with status reporting.
#[derive(Debug, Default)]
pub struct IngestStatus {
    /// Connected to the broker right now.
    pub connected: AtomicBool,
    /// Every subscription acknowledged by the broker in the current connection.
    pub subscribed: AtomicBool,
    /// Messages received from the broker.
    pub messages: AtomicU64,
    /// Readings committed to the journal.
    pub readings: AtomicU64,
    /// Messages rejected (any reason).
    pub rejected: AtomicU64,
    /// Redeliveries recognised and dropped.
    pub duplicates: AtomicU64,
    /// Reconnects to the broker.
    pub reconnects: AtomicU64,
    /// Last connection error, for status.
    pub last_error: Mutex<Option<String>>,
    /// The last rejected messages (bounded by [`REJECTS_KEPT`]).
    pub rejects: Mutex<VecDeque<RejectedMessage>>,
    /// Connections on which the broker had lost edgeferry's persistent session although it
    /// should have kept it (a reconnect, or a start with a journal from earlier runs): what
    /// it queued meanwhile may be gone.
    pub sessions_lost: AtomicU64,
    /// Wall-clock ms of the last such connection (0: never).
    pub last_session_lost_ms: std::sync::atomic::AtomicI64,
    /// The broker should already hold a session for edgeferry (the journal has records from
    /// an earlier run), so a first CONNACK without one is a loss, not a first start.
    pub expect_session: AtomicBool,
    /// Messages rejected because their event time was ahead of this gateway's clock by more
    /// than `mqtt.future_skew`.
    pub future_rejected: AtomicU64,
    /// Wall-clock ms of the last such rejection (0: never).
    pub last_future_ms: std::sync::atomic::AtomicI64,
    /// Why the journal cannot write, while it cannot (a full disk): ingest is holding back
    /// and retrying.
    pub journal_error: Mutex<Option<String>>,
    /// The journal's last write failed because the disk is full (ENOSPC): with
    /// `store.when_full = "drop_oldest"` processing frees aggregate space for it.
    pub journal_full: AtomicBool,
    /// Messages whose newest event time was more than `mqtt.future_skew` ahead of or behind
    /// this gateway's clock while it was not synchronised (accepted).
    pub clock_disagreements: AtomicU64,
    /// By how much the last of them disagreed: event time − arrival time, ms.
    pub clock_disagreement_ms: AtomicI64,
    /// Monotonic ms ([`crate::clock::mono_ms`]) of the last of them (0: never).
    pub last_clock_disagreement_mono: AtomicI64,
}

/// How many rejected messages status keeps.
pub const REJECTS_KEPT: usize = 20;

impl IngestStatus {
    /// Sets or clears why the journal cannot write.
    pub fn set_journal_error(&self, e: Option<String>) {
        *self.journal_error.lock().unwrap_or_else(|e| e.into_inner()) = e;
    }

    /// Why the journal cannot write, if it cannot.
    pub fn journal_error(&self) -> Option<String> {
        self.journal_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn note_clock_disagreement(&self, offset_ms: i64) {
        self.clock_disagreements.fetch_add(1, Ordering::Relaxed);
        self.clock_disagreement_ms
            .store(offset_ms, Ordering::Relaxed);
        self.last_clock_disagreement_mono
            .store(crate::clock::mono_ms().max(1), Ordering::Relaxed);
    }

    pub(crate) fn remember_reject(&self, r: RejectedMessage) {
        let mut q = self.rejects.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() == REJECTS_KEPT {
            q.pop_front();
        }
        q.push_back(r);
    }

    pub(crate) fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = e;
    }

    /// A copy of the kept rejected messages, oldest first.
    pub fn recent_rejects(&self) -> Vec<RejectedMessage> {
        self.rejects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// The last connection error, if the link is down.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Shorthand used by status.
    pub fn get(v: &AtomicU64) -> u64 {
        v.load(Ordering::Relaxed)
    }
}
