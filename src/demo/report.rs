//! What the demo prints: the live status line and the closing report.

use super::collector::CollectorView;
use super::scenario::*;
use crate::model::StatusReport;
use std::fmt::Write as _;
use std::time::Instant;

/// The closing report and whether it matched.
pub(super) struct Report {
    pub(super) text: String,
    pub(super) matched: bool,
}

pub(super) fn closing_report(
    published: u64,
    status: Option<&StatusReport>,
    seen: &CollectorView,
) -> Report {
    let mut t = String::new();
    let mut matched = published > 0;
    let _ = writeln!(t, "\n== edgeferry demo: closing report ==");
    let _ = writeln!(
        t,
        "readings published by the sensors (PUBACKed)          {published:>8}"
    );
    if let Some(s) = status {
        let _ = writeln!(
            t,
            "readings journaled by edgeferry                        {:>8}  ({} rejected, {} duplicates dropped)",
            s.ingest.readings, s.ingest.rejected, s.ingest.duplicates_dropped
        );
    }
    for w in WINDOWS {
        let n = seen.counts.get(&w).copied().unwrap_or(0);
        let ok = n == published;
        matched &= ok;
        let _ = writeln!(
            t,
            "readings counted at the collector, {w:>2}s windows         {n:>8}  {}",
            if ok { "MATCH" } else { "MISMATCH" }
        );
    }
    let _ = writeln!(
        t,
        "  (sum of count over the highest version of each (series, window_start); {} aggregate lines, {} windows)",
        seen.aggregate_lines, seen.windows
    );
    let raised: u64 = seen
        .alerts
        .iter()
        .filter(|((_, s), _)| s == "raised")
        .map(|(_, n)| n)
        .sum();
    let cleared: u64 = seen
        .alerts
        .iter()
        .filter(|((_, s), _)| s == "cleared")
        .map(|(_, n)| n)
        .sum();
    let _ = writeln!(
        t,
        "alerts seen at the collector: raised {raised}, cleared {cleared}"
    );
    let mut rules: Vec<&String> = seen.alerts.keys().map(|(r, _)| r).collect();
    rules.dedup();
    for rule in rules {
        let get = |state: &str| {
            seen.alerts
                .get(&(rule.clone(), state.to_string()))
                .copied()
                .unwrap_or(0)
        };
        let _ = writeln!(
            t,
            "  {rule:<14} raised {}, cleared {}",
            get("raised"),
            get("cleared")
        );
    }
    let _ = writeln!(t, "RESULT: {}", if matched { "MATCH" } else { "MISMATCH" });
    Report { text: t, matched }
}

/// One status line: rates, totals, backlog, link state, alerts.
pub(super) fn live_line(s: &StatusReport, last: &mut Option<(Instant, u64)>) -> String {
    let now = Instant::now();
    let rate = match *last {
        Some((t, n)) if now > t => {
            s.ingest.readings.saturating_sub(n) as f64 / (now - t).as_secs_f64()
        }
        _ => 0.0,
    };
    *last = Some((now, s.ingest.readings));
    let b = &s.backlog;
    let backlog = if b.batches == 0 {
        "backlog empty".to_string()
    } else {
        format!(
            "backlog {} batches/{} items, oldest {}s",
            b.batches,
            b.items,
            b.oldest_age_secs.unwrap_or(0)
        )
    };
    let upstream = match &s.upstream {
        Some(u) if u.connected => "upstream connected".to_string(),
        Some(_) => "upstream DOWN".to_string(),
        None => "no upstream".to_string(),
    };
    // A (rule, series) pair alternates raised, cleared, ...: raised = cleared + active.
    let raised = (s.process.alerts + s.process.alerts_active) / 2;
    format!(
        "in {rate:>5.1}/s  readings {:>6}  windows out {:>4}  {backlog:<38} {upstream:<18}  alerts raised {raised} (active {})",
        s.ingest.readings, s.process.windows_emitted, s.process.alerts_active
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(counts: &[(u64, u64)]) -> CollectorView {
        CollectorView {
            counts: counts.iter().copied().collect(),
            ..CollectorView::default()
        }
    }

    #[test]
    fn the_report_matches_only_when_every_window_length_counts_every_published_reading() {
        let all: Vec<(u64, u64)> = WINDOWS.iter().map(|&w| (w, 120)).collect();
        let r = closing_report(120, None, &view(&all));
        assert!(r.matched, "{}", r.text);
        assert!(r.text.contains("RESULT: MATCH"));

        let mut short = all.clone();
        short[0].1 = 119;
        let r = closing_report(120, None, &view(&short));
        assert!(!r.matched);
        assert!(r.text.contains("RESULT: MISMATCH"));

        let r = closing_report(0, None, &view(&[]));
        assert!(!r.matched, "nothing published is not a successful demo");
    }

    #[test]
    fn alerts_are_summed_per_rule_and_state() {
        let mut v = view(&[]);
        v.alerts.insert(("overheat".into(), "raised".into()), 2);
        v.alerts.insert(("overheat".into(), "cleared".into()), 1);
        let r = closing_report(1, None, &v);
        assert!(r.text.contains("raised 2, cleared 1"), "{}", r.text);
    }
}
