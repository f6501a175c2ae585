//! The collector's memory budget for batches in flight (`--max-buffered`), shared by every
//! source (WebSocket connections and the MQTT subscription): a batch's JSON lines hold their
//! room from the moment it is handed to the sinks until they made it durable.

use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// The bytes of batches handed to the sinks and not yet stored, in KiB (`max_buffered`):
/// a session waits for room before it hands over another.
#[derive(Clone)]
pub struct Buffer {
    room: Arc<Semaphore>,
    kib: u32,
}

/// `bytes` in whole KiB, rounded up, at least 1 and at most `max`.
fn kib(bytes: u64, max: u32) -> u32 {
    u32::try_from(bytes.div_ceil(1024))
        .unwrap_or(u32::MAX)
        .clamp(1, max)
}

impl Buffer {
    /// A budget of `bytes` (kept in whole KiB).
    pub fn new(bytes: u64) -> Buffer {
        let kib = kib(bytes, Semaphore::MAX_PERMITS as u32);
        Buffer {
            room: Arc::new(Semaphore::new(kib as usize)),
            kib,
        }
    }

    /// Room for `bytes` (a batch larger than all of it takes all of it); waits, counted,
    /// while it is full. `None`: shut down while waiting.
    pub async fn reserve(&self, bytes: usize, shutdown: &CancellationToken) -> Option<Reserved> {
        let kib = kib(bytes as u64, self.kib);
        let permit = match self.room.clone().try_acquire_many_owned(kib) {
            Ok(p) => p,
            Err(_) => {
                metrics::counter!("edgeferry_collect_buffer_full_total").increment(1);
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    p = self.room.clone().acquire_many_owned(kib) => p.ok()?,
                }
            }
        };
        self.report();
        Some(Reserved {
            permit: Some(permit),
            buffer: self.clone(),
        })
    }

    fn report(&self) {
        let used = self.kib as usize - self.room.available_permits();
        metrics::gauge!("edgeferry_collect_buffered_bytes").set((used * 1024) as f64);
    }
}

/// A batch's room in the [`Buffer`], given back when dropped.
pub struct Reserved {
    permit: Option<OwnedSemaphorePermit>,
    buffer: Buffer,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.buffer.report();
    }
}
