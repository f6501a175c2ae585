//! The human-readable forms of the verify and repair reports.

use std::fmt;

use super::repair::RepairReport;
use super::verify::*;

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{n} B ({v:.1} {})", UNITS[u])
}

impl fmt::Display for StoreReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "store {}", self.data_dir.display())?;
        if self.daemon_running {
            match self.daemon_pid {
                Some(pid) => writeln!(f, "daemon pid {pid} is running; results may be stale")?,
                None => writeln!(f, "a daemon (pid unknown) is running; results may be stale")?,
            }
        }
        for p in &self.parts {
            let state = match p.state {
                PartState::Ok => "OK",
                PartState::Missing => "MISSING",
                PartState::Damaged => "DAMAGED",
            };
            write!(f, "{:<18} {:<8} {}", p.part, state, p.summary)?;
            if p.state != PartState::Missing {
                write!(f, "; {} on disk", human_bytes(p.bytes))?;
            }
            writeln!(f)?;
            writeln!(f, "{:<27} {}", "", p.path.display())?;
            for d in &p.damage {
                writeln!(
                    f,
                    "{:<27} {} byte(s) bad in {} from offset {}: {}{}",
                    "",
                    d.bytes,
                    d.file.display(),
                    d.offset,
                    d.what,
                    if d.torn_tail {
                        " [torn tail of the last segment: a crash leaves this; it is cut]"
                    } else if p.segments.is_some() {
                        " [records before it are kept; the rest goes to quarantine]"
                    } else {
                        ""
                    }
                )?;
            }
        }
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        if !self.quarantined.is_empty() {
            let total: u64 = self.quarantined.iter().map(|q| q.bytes).sum();
            writeln!(
                f,
                "quarantine: {} file(s), {} set aside earlier (kept for inspection):",
                self.quarantined.len(),
                human_bytes(total)
            )?;
            for q in &self.quarantined {
                writeln!(f, "  {} ({} B)", q.path.display(), q.bytes)?;
            }
        }
        let damaged: Vec<&str> = self
            .parts
            .iter()
            .filter(|p| p.state == PartState::Damaged)
            .map(|p| p.part)
            .collect();
        if damaged.is_empty() {
            writeln!(f, "verdict: OK: no damage found")
        } else {
            writeln!(
                f,
                "verdict: DAMAGED: {} (run `edgeferry store repair` with the daemon stopped; \
                 the daemon also salvages on start)",
                damaged.join(", ")
            )
        }
    }
}

impl fmt::Display for RepairReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "repaired store {}", self.data_dir.display())?;
        for l in &self.logs {
            write!(
                f,
                "{:<18} kept {} record(s) (lsn {}.., next {})",
                l.part, l.records_kept, l.first_lsn, l.next_lsn
            )?;
            if l.truncated_bytes > 0 {
                write!(f, "; cut a torn tail of {} B", l.truncated_bytes)?;
            }
            if l.quarantined_bytes > 0 {
                write!(f, "; quarantined {} damaged B", l.quarantined_bytes)?;
            }
            writeln!(f)?;
        }
        if self.moved.is_empty() {
            writeln!(f, "nothing needed moving to quarantine")?;
        } else {
            writeln!(f, "moved to quarantine (nothing was deleted):")?;
            for m in &self.moved {
                writeln!(
                    f,
                    "  {}: {} ({} B)\n    -> {}",
                    m.what,
                    m.from.display(),
                    m.bytes,
                    m.to.display()
                )?;
            }
        }
        if let Some(d) = &self.quarantine_dir {
            writeln!(f, "quarantine folder: {} (see REPAIR.txt)", d.display())?;
        }
        writeln!(f, "\nafter repair:")?;
        write!(f, "{}", self.after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_exact_bytes_with_a_readable_unit() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1536 B (1.5 KiB)");
        assert_eq!(human_bytes(8 << 20), "8388608 B (8.0 MiB)");
        assert_eq!(
            human_bytes(u64::MAX),
            "18446744073709551615 B (16777216.0 TiB)"
        );
    }
}
