//! Journal recovery from arbitrary bytes in its segment file (what a power cut, a bad SD card
//! or a stray write leaves): the journal opens, salvages what is valid, reads it back and
//! takes new records, never a panic.
#![no_main]
use edgeferry::store::journal::Journal;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    std::fs::create_dir_all(&journal).unwrap();
    std::fs::write(journal.join("00000000000000000000.seg"), data).unwrap();
    let Ok((j, _recovery)) = Journal::open(&journal, 64 * 1024) else {
        return;
    };
    let next = j.next_lsn();
    if let Ok(records) = j.read_from(j.first_lsn()) {
        let n = records.count() as u64;
        assert!(n <= next - j.first_lsn());
    }
    let _ = j.tail_keys(100, &[true]);
});
