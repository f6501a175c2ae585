//! Outbox recovery from arbitrary bytes in its lane segments and its acknowledgement state
//! (what a power cut, a bad SD card or a stray write leaves): the outbox opens, lists its
//! backlog, hands out what it still holds and takes new batches, never a panic.
#![no_main]
use edgeferry::store::outbox::{Lane, Outbox};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first two bytes say how many of the rest are `acked.bin`; what follows is split in
    // two halves, the aggregates lane's segment and the alerts lane's.
    let (acks, segs) = match data {
        [a, b, rest @ ..] => {
            let n = (u16::from_le_bytes([*a, *b]) as usize).min(rest.len());
            rest.split_at(n)
        }
        _ => (&[][..], data),
    };
    let (agg, alr) = segs.split_at(segs.len() / 2);
    let dir = tempfile::tempdir().unwrap();
    for (lane, bytes) in [(Lane::Aggregates, agg), (Lane::Alerts, alr)] {
        let d = dir.path().join(lane.as_str());
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("00000000000000000000.seg"), bytes).unwrap();
    }
    std::fs::write(dir.path().join("acked.bin"), acks).unwrap();
    let Ok((mut o, _)) = Outbox::open(dir.path(), 64 * 1024) else {
        return;
    };
    for lane in Lane::PRIORITY {
        let _ = o.backlog(lane);
        let next = o.next_lsn(lane);
        if let Ok(batches) = o.unacked(lane, 0, next, usize::MAX) {
            assert!(batches.len() as u64 <= next - o.first_lsn(lane));
            for b in &batches {
                let _ = o.ack(b.seq);
            }
        }
        if let Ok(seq) = o.append(lane, 1, 0, b"new") {
            if o.sync().is_ok() {
                let (l, lsn) = edgeferry::store::outbox::lane_lsn(seq);
                assert_eq!(l, lane);
                let got = o.unacked(lane, lsn, lsn + 1, 1).unwrap();
                assert_eq!(got.len(), 1, "a batch appended after recovery is readable");
                assert_eq!(got[0].payload, b"new");
            }
        }
    }
    let _ = o.persist_acks();
});
