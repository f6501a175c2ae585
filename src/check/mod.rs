//! `edgeferry store verify` and `edgeferry store repair`: offline checks and salvage of a
//! whole data directory.
//!
//! The parts of a store (`<data_dir>/`): the journal (`journal/`, a segment log), the two
//! outbox lanes (`outbox/aggregates/`, `outbox/alerts/`, segment logs), the processing
//! checkpoint (`state/checkpoint.bin`, envelope `EFCK` v6 with its deltas
//! `state/checkpoint-delta-NNNNNN.bin`, envelope `EFCD` v2, both compressed; the versions
//! before are read too), the outbox acknowledgement state (`outbox/acked.bin`, envelope `EFAK`
//! v1), the store epoch (`epoch`, 16 hex digits) and the Sparkplug B decoder's state
//! (`state/sparkplug/*.node`, one per edge node, envelope `EFSP` v1, only where Sparkplug B
//! is subscribed).
//!
//! * [`verify`] reads everything and changes nothing. It takes no lock, but says when a
//!   daemon holds one (its results may then be stale: the daemon keeps writing).
//! * [`repair`] takes the logs' locks (so it refuses while the daemon runs), lets each segment
//!   log salvage itself the way the daemon's start-up does (torn tails cut, damaged bytes moved
//!   to `<log>/quarantine/`), moves a damaged checkpoint, acknowledgement state or epoch aside,
//!   and collects every quarantined piece, including ones the daemon set aside earlier, into
//!   one dated folder `<data_dir>/quarantine/<UTC date-time>/`, mirroring the paths they came
//!   from. Nothing is ever deleted: a torn tail that the log cuts is copied there first.
//!
//! The daemon itself never needs `repair` to start: it salvages the same way on its own.

mod error;
mod layout;
mod repair;
mod report;
mod verify;

pub use error::CheckError;
pub use layout::{QuarantinedFile, STORE_QUARANTINE};
pub use repair::{LogRepair, Moved, RepairReport, repair};
pub use verify::{DamageItem, PartReport, PartState, StoreReport, verify};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::layout::*;
    use crate::store::epoch::EPOCH_FILE as EPOCH;
    use crate::store::seglog::{LogConfig, SegmentLog};
    use std::fs::{self, File};
    use std::path::{Path, PathBuf};
    fn write_log(dir: &Path, n: u64) {
        let (mut log, _) = SegmentLog::open(dir, LogConfig::default()).unwrap();
        for i in 0..n {
            log.append(format!("record {i}").as_bytes()).unwrap();
        }
        log.sync().unwrap();
    }

    fn store(n: u64) -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        write_log(&tmp.path().join("journal"), n);
        write_log(&tmp.path().join("outbox/aggregates"), 3);
        write_log(&tmp.path().join("outbox/alerts"), 0);
        fs::write(tmp.path().join("epoch"), "00112233aabbccdd\n").unwrap();
        tmp
    }

    fn segment(dir: &Path) -> PathBuf {
        let mut v: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        v.sort();
        v.pop().unwrap()
    }

    #[test]
    fn a_clean_store_verifies_clean_and_repair_moves_nothing() {
        let tmp = store(50);
        let r = verify(tmp.path()).unwrap();
        assert!(r.clean, "{r}");
        assert_eq!(r.parts[0].records, Some(50));
        assert_eq!(
            (r.parts[0].first_lsn, r.parts[0].last_lsn),
            (Some(0), Some(49))
        );
        assert_eq!(r.parts[3].state, PartState::Missing);
        assert!(!r.daemon_running);
        let text = r.to_string();
        assert!(text.contains("verdict: OK"), "{text}");
        let rep = repair(tmp.path(), 1 << 20).unwrap();
        assert!(
            rep.moved.is_empty() && rep.quarantine_dir.is_none(),
            "{rep}"
        );
        assert!(rep.after.clean);
        assert!(!tmp.path().join(STORE_QUARANTINE).exists());
    }

    #[test]
    fn damage_everywhere_is_reported_and_repair_moves_it_all_to_one_dated_folder() {
        let tmp = store(200);
        let seg = segment(&tmp.path().join("journal"));
        let mut bytes = fs::read(&seg).unwrap();
        let at = bytes.len() * 2 / 5;
        bytes[at] ^= 0xFF;
        bytes[at + 1] ^= 0xFF;
        fs::write(&seg, &bytes).unwrap();
        let agg = segment(&tmp.path().join("outbox/aggregates"));
        let len = fs::metadata(&agg).unwrap().len();
        File::options()
            .write(true)
            .open(&agg)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        fs::create_dir_all(tmp.path().join("state")).unwrap();
        fs::write(tmp.path().join(CHECKPOINT), b"garbage").unwrap();
        fs::write(tmp.path().join(ACKS), b"EFAK junk").unwrap();
        fs::write(tmp.path().join(EPOCH), b"xyz").unwrap();
        fs::create_dir_all(tmp.path().join(SPARKPLUG)).unwrap();
        let node = Path::new(SPARKPLUG).join("0000000100000002.node");
        fs::write(tmp.path().join(&node), b"EFSP half a file").unwrap();

        let r = verify(tmp.path()).unwrap();
        assert!(!r.clean);
        let damaged: Vec<_> = r
            .parts
            .iter()
            .filter(|p| p.state == PartState::Damaged)
            .map(|p| p.part)
            .collect();
        assert_eq!(
            damaged,
            ["journal", "checkpoint", "acked", "epoch", "sparkplug"],
            "a torn tail alone (outbox/aggregates) is what a crash leaves, not damage"
        );
        assert!(r.parts[1].summary.contains("torn tail"), "{:?}", r.parts[1]);
        let d = &r.parts[0].damage[0];
        assert_eq!(d.file, seg);
        assert!(d.offset <= at as u64 && !d.torn_tail, "{d:?}");
        assert!(r.parts[1].damage[0].torn_tail);
        assert_eq!(fs::read(&seg).unwrap(), bytes, "verify changes nothing");
        let text = r.to_string();
        assert!(text.contains(&seg.display().to_string()), "{text}");
        assert!(
            text.contains(&format!("from offset {}", d.offset)),
            "{text}"
        );

        let rep = repair(tmp.path(), 1 << 20).unwrap();
        assert!(rep.after.clean, "{rep}");
        let qdir = rep.quarantine_dir.clone().unwrap();
        assert!(qdir.starts_with(tmp.path().join(STORE_QUARANTINE)));
        for m in &rep.moved {
            assert!(m.to.starts_with(&qdir), "{m:?}");
            assert!(m.to.exists(), "{m:?}");
        }
        // The journal's damaged tail, byte for byte.
        let tail = rep
            .moved
            .iter()
            .find(|m| m.from.starts_with(tmp.path().join("journal")))
            .unwrap();
        assert_eq!(fs::read(&tail.to).unwrap(), &bytes[d.offset as usize..]);
        assert_eq!(fs::read(qdir.join(CHECKPOINT)).unwrap(), b"garbage");
        assert_eq!(fs::read(qdir.join(EPOCH)).unwrap(), b"xyz");
        assert!(qdir.join(ACKS).exists());
        assert_eq!(fs::read(qdir.join(&node)).unwrap(), b"EFSP half a file");
        // The torn outbox tail was cut, and a copy kept.
        assert!(rep.moved.iter().any(|m| m.what.starts_with("torn tail")));
        assert!(qdir.join("REPAIR.txt").exists());
        assert!(!tmp.path().join(CHECKPOINT).exists());
        let kept = rep.logs[0].records_kept;
        assert!(kept > 0 && kept < 200);
        assert!(rep.logs[0].next_lsn >= 200, "lsns are not reused: {rep}");
        // Nothing is left in the logs' own quarantine folders.
        assert!(
            rep.after
                .quarantined
                .iter()
                .all(|f| f.path.starts_with(&qdir)),
            "{rep}"
        );
    }

    #[test]
    fn repair_refuses_while_the_log_is_held_and_verify_names_the_pid() {
        let tmp = store(5);
        let (_log, _) =
            SegmentLog::open(&tmp.path().join("journal"), LogConfig::default()).unwrap();
        let r = verify(tmp.path()).unwrap();
        assert!(r.daemon_running);
        assert_eq!(r.daemon_pid, Some(std::process::id()));
        assert!(r.to_string().contains(&format!(
            "daemon pid {} is running; results may be stale",
            std::process::id()
        )));
        let err = repair(tmp.path(), 1 << 20).unwrap_err();
        assert!(matches!(err, CheckError::Locked { .. }), "{err}");
        assert!(
            err.to_string()
                .contains(&format!("daemon pid {} is running", std::process::id())),
            "{err}"
        );
    }
}
