//! Configuration of local storage (`[store]`).

use crate::validate::Problems;
use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

/// `[store]`: the disk quota shared by the journal and the outbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Upper bound of the data directory's bytes on disk: journal, outbox and checkpoint
    /// (see `process::Processor::enforce_quota`).
    #[serde(default = "default_max_disk")]
    pub max_disk: ByteSize,
    /// What to do when `max_disk` is reached.
    #[serde(default)]
    pub when_full: WhenFull,
    /// Segment file size of the journal and the outbox lanes: trimming frees whole segments,
    /// so smaller segments give back space sooner at the cost of more files. Unset: a
    /// sixteenth of `max_disk`, between 64 KiB and 8 MiB (see [`StoreConfig::segment_bytes`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment_size: Option<ByteSize>,
    /// The card's rated write endurance (its TBW, e.g. "40TB"): when set, the status shows
    /// how many years edgeferry's write rate takes to reach it. Informational only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endurance: Option<ByteSize>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            max_disk: default_max_disk(),
            when_full: WhenFull::default(),
            segment_size: None,
            endurance: None,
        }
    }
}

/// Policy at the disk quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Drop the oldest aggregate batches (never alerts before aggregates); counted.
    #[default]
    DropOldest,
    /// Stop acknowledging the broker: backpressure onto the broker's own queue.
    Block,
}

fn default_max_disk() -> ByteSize {
    ByteSize::gib(1)
}
/// The largest segment size chosen by default: big enough that a busy journal rolls a few
/// times a minute, small enough that trimming gives space back promptly.
pub const MAX_DEFAULT_SEGMENT: u64 = 8 << 20;
/// The smallest segment size chosen by default.
pub const MIN_DEFAULT_SEGMENT: u64 = 64 << 10;

impl StoreConfig {
    /// The segment size in effect: `segment_size` when set, else a sixteenth of `max_disk`
    /// clamped to 64 KiB..8 MiB. Three logs (journal, two outbox lanes) each keep an active
    /// segment that cannot be freed, so segments must be small against the quota or a small
    /// disk cannot be trimmed at all (8 MiB segments under a 3 MiB quota never were).
    pub fn segment_bytes(&self) -> u64 {
        self.segment_size.map(|s| s.as_u64()).unwrap_or_else(|| {
            (self.max_disk.as_u64() / 16).clamp(MIN_DEFAULT_SEGMENT, MAX_DEFAULT_SEGMENT)
        })
    }

    /// Checks `[store]` beyond what serde can.
    pub fn validate(&self, p: &mut Problems) {
        if self.max_disk.as_u64() < 1024 * 1024 {
            p.push(format!(
                "store.max_disk = \"{}\": expected at least 1MiB",
                self.max_disk
            ));
        }
        if let Some(seg) = self.segment_size {
            let most = self.max_disk.as_u64() / 4;
            if seg.as_u64() > most {
                p.push(format!(
                    "store.segment_size = \"{seg}\": expected at most a quarter of store.max_disk \
                     ({}): space is freed a whole segment at a time, and the journal and both \
                     outbox lanes each keep one open; or leave it unset",
                    ByteSize::b(most)
                ));
            }
            if seg.as_u64() < 4096 {
                p.push(format!(
                    "store.segment_size = \"{seg}\": expected at least 4KiB"
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_default_to_a_sixteenth_of_the_quota_and_an_explicit_one_must_fit_it() {
        let quota = |q: ByteSize| StoreConfig {
            max_disk: q,
            ..StoreConfig::default()
        };
        assert_eq!(
            StoreConfig::default().segment_bytes(),
            8 << 20,
            "1 GiB quota"
        );
        assert_eq!(quota(ByteSize::mib(32)).segment_bytes(), 2 << 20);
        assert_eq!(quota(ByteSize::mib(3)).segment_bytes(), 192 << 10);
        assert_eq!(quota(ByteSize::mib(1)).segment_bytes(), 64 << 10);
        let explicit = StoreConfig {
            segment_size: Some(ByteSize::mib(8)),
            ..quota(ByteSize::mib(3))
        };
        assert_eq!(explicit.segment_bytes(), 8 << 20);
        let mut p = Problems::new();
        explicit.validate(&mut p);
        let v = p.into_vec();
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].starts_with("store.segment_size = \"8.0 MiB\": expected at most a quarter"));
    }

    #[test]
    fn a_quota_below_one_mebibyte_is_refused() {
        let mut p = Problems::new();
        StoreConfig::default().validate(&mut p);
        assert!(p.is_empty());
        let small = StoreConfig {
            max_disk: ByteSize::kib(512),
            ..StoreConfig::default()
        };
        small.validate(&mut p);
        assert_eq!(
            p.into_vec(),
            ["store.max_disk = \"512.0 KiB\": expected at least 1MiB"]
        );
    }
}
