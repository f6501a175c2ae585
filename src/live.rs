//! The live event feed: a bounded broadcast of what the pipeline does right now, for the admin
//! endpoint's `/live` WebSocket (the dashboard at `/` and `edgeferry tail`).
//!
//! The feed is a view, never a part of the data path: sending never blocks or fails, nothing
//! is built when nobody listens, readings are sampled (at most [`READINGS_PER_SERIES_PER_SEC`]
//! per series and [`READINGS_PER_SEC`] in all, each second) so a fast drain cannot flood it,
//! and a receiver that falls more than [`CAPACITY`] events behind misses the oldest ones
//! (counted in `edgeferry_live_events_lagged_total`).

use crate::model::StatusReport;
use crate::model::{AlertState, Reading};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use tokio::sync::broadcast;

/// Events the feed holds before the slowest receiver starts missing some.
pub const CAPACITY: usize = 1024;
/// Readings of one series passed to the feed per second, at most.
pub const READINGS_PER_SERIES_PER_SEC: u32 = 5;
/// Readings passed to the feed per second in all, at most.
pub const READINGS_PER_SEC: u32 = 500;
/// The Prometheus counter of events receivers missed because they fell behind.
pub const LAGGED_METRIC: &str = "edgeferry_live_events_lagged_total";

/// One message of the live feed, as sent (JSON, `{"type": "reading", ...}`) on `/live`.
///
/// The pipeline sends `Reading`, `Window` and `Alert`; the WebSocket session adds `Status`
/// (first, then every second) and `Lagged` (when it fell behind and missed events).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LiveEvent {
    /// A reading, just committed to the journal (sampled).
    Reading {
        /// Series key (`metric{tag=value,...}`).
        series: String,
        /// Metric name (the part of `series` before the tags).
        metric: String,
        /// Tags identifying the sensor (from the topic template's named levels), in key order.
        tags: BTreeMap<String, String>,
        /// The decoded value, always finite.
        value: f64,
        /// Event time, ms since the Unix epoch.
        time_ms: i64,
    },
    /// A window closed (or a correction of it) and was emitted.
    Window {
        /// Series key (`metric{tag=value,...}`) of the aggregated readings; `tail --series`
        /// filters on it.
        series: String,
        /// Start of the window, ms since the Unix epoch.
        window_start_ms: i64,
        /// Window length, seconds.
        window_secs: u32,
        /// 1 for the first emission, +1 per correction.
        version: u32,
        /// Readings in the window.
        count: u64,
        /// Arithmetic mean of their values.
        mean: f64,
        /// Smallest value among them (exact, not from the quantile sketch).
        min: f64,
        /// Largest value among them (exact, not from the quantile sketch).
        max: f64,
    },
    /// An alert was raised or cleared.
    Alert {
        /// Name of the `[[rules]]` entry that raised or cleared the alert.
        rule: String,
        /// Series key of the series the alert is about (the silent one, for silence alerts).
        series: String,
        /// Raised or cleared.
        state: AlertState,
        /// The triggering value (none for silence alerts).
        value: Option<f64>,
        /// Event time (processing time for silence alerts), ms since the Unix epoch.
        time_ms: i64,
    },
    /// A status snapshot (the same report as `/status`).
    Status {
        /// The same report `/status` returns (boxed: it is much larger than the other events).
        status: Box<StatusReport>,
    },
    /// This client fell behind and `missed` events were skipped.
    Lagged {
        /// How many events this client missed; also added to `edgeferry_live_events_lagged_total`.
        missed: u64,
    },
}

impl LiveEvent {
    /// The series the event is about (none for status and lag notices).
    pub fn series(&self) -> Option<&str> {
        match self {
            LiveEvent::Reading { series, .. }
            | LiveEvent::Window { series, .. }
            | LiveEvent::Alert { series, .. } => Some(series),
            LiveEvent::Status { .. } | LiveEvent::Lagged { .. } => None,
        }
    }
}

/// The sending side of the feed, cheap to clone into each stage.
#[derive(Debug, Clone)]
pub struct LiveFeed {
    tx: broadcast::Sender<LiveEvent>,
}

impl Default for LiveFeed {
    fn default() -> Self {
        Self::new(CAPACITY)
    }
}

impl LiveFeed {
    /// A feed holding at most `capacity` events per receiver.
    pub fn new(capacity: usize) -> Self {
        // Registered at zero, so dashboards see the counter before anything lagged.
        metrics::counter!(LAGGED_METRIC).increment(0);
        Self {
            tx: broadcast::channel(capacity.max(1)).0,
        }
    }

    /// A new receiver, seeing events sent from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<LiveEvent> {
        self.tx.subscribe()
    }

    /// Whether anybody listens (producers skip building events otherwise).
    pub fn has_receivers(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// Sends without waiting; without receivers the event is simply dropped.
    pub fn send(&self, ev: LiveEvent) {
        let _ = self.tx.send(ev);
    }
}

/// The committer's side: samples readings so that a drain of tens of thousands per second
/// passes at most a few per series and a bounded number in all.
#[derive(Debug)]
pub struct ReadingSampler {
    feed: LiveFeed,
    second: i64,
    total: u32,
    per_series: HashMap<String, u32>,
}

impl ReadingSampler {
    /// A sampler passing the readings its per-second budgets allow on to `feed`.
    pub fn new(feed: LiveFeed) -> Self {
        Self {
            feed,
            second: i64::MIN,
            total: 0,
            per_series: HashMap::new(),
        }
    }

    /// Whether anybody listens: when not, callers need not look at their readings at all.
    pub fn active(&self) -> bool {
        self.feed.has_receivers()
    }

    /// Offers committed readings received at `now_ms`; passes on those the budget allows.
    pub fn offer<'a>(&mut self, now_ms: i64, readings: impl IntoIterator<Item = &'a Reading>) {
        let second = now_ms.div_euclid(1000);
        if second != self.second {
            self.second = second;
            self.total = 0;
            self.per_series.clear();
        }
        for r in readings {
            if self.total >= READINGS_PER_SEC {
                return;
            }
            let series = r.series_key();
            let n = self.per_series.entry(series.clone()).or_insert(0);
            if *n >= READINGS_PER_SERIES_PER_SEC {
                continue;
            }
            *n += 1;
            self.total += 1;
            self.feed.send(LiveEvent::Reading {
                series,
                metric: r.metric.clone(),
                tags: r.tags.clone(),
                value: r.value,
                time_ms: r.time_ms,
            });
        }
    }
}

/// Glob-like matching of a series key: `*` matches any run of characters (also none), `?`
/// exactly one; everything else matches itself. The whole key must match.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    // Position of the last `*` seen and the text position it was tried at.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || (p[pi] != '*' && p[pi] == t[ti])) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            // Let the last `*` swallow one more character and retry.
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// How `edgeferry tail` ended without an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailEnd {
    /// Stopped by the user (Ctrl-C) or the output was closed.
    Stopped,
    /// The daemon closed the feed (it is shutting down), with its reason.
    DaemonClosed(String),
}

/// Why `edgeferry tail` could not (or could no longer) follow the feed.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    /// Nothing answered at the admin address, or not with a WebSocket.
    #[error("cannot connect to the daemon's live feed at {url}: {reason}")]
    Connect {
        /// The `ws://.../live` URL tried, with the `?series=` filter if any.
        url: String,
        /// The WebSocket client's error (e.g. connection refused), or that nothing answered
        /// within 5 s.
        reason: String,
    },
    /// The established connection broke: a WebSocket error, or it closed without a close
    /// frame (a daemon shutting down sends one and ends the tail normally).
    #[error("lost the connection to the daemon: {0}")]
    Lost(String),
}

/// Follows `/live` on the admin endpoint at `addr` (host:port, plain WebSocket on loopback)
/// and writes one line per reading, window and alert of series matching `pattern` to `out`,
/// and notes (connected, missed events) to `notes`, until `stop` completes or the daemon
/// closes the feed.
pub async fn tail(
    addr: &str,
    pattern: Option<&str>,
    out: &mut (dyn std::io::Write + Send),
    notes: &mut (dyn std::io::Write + Send),
    stop: impl std::future::Future<Output = ()>,
) -> Result<TailEnd, TailError> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut url = format!("ws://{addr}/live");
    if let Some(p) = pattern {
        url.push_str("?series=");
        url.extend(url::form_urlencoded::byte_serialize(p.as_bytes()));
    }
    let connect = tokio_tungstenite::connect_async(url.as_str());
    let (mut ws, _) = match tokio::time::timeout(std::time::Duration::from_secs(5), connect).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return Err(TailError::Connect {
                url,
                reason: e.to_string(),
            });
        }
        Err(_) => {
            return Err(TailError::Connect {
                url,
                reason: "no answer within 5 s".into(),
            });
        }
    };
    tokio::pin!(stop);
    let mut greeted = false;
    loop {
        let msg = tokio::select! {
            _ = &mut stop => {
                let _ = ws.close(None).await;
                return Ok(TailEnd::Stopped);
            }
            m = ws.next() => m,
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(frame))) => {
                return Ok(TailEnd::DaemonClosed(
                    frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                ));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(TailError::Lost(e.to_string())),
            None => return Err(TailError::Lost("the connection closed".into())),
        };
        let Ok(ev) = serde_json::from_str::<LiveEvent>(&text) else {
            continue; // a newer daemon's event kind: skip it
        };
        match &ev {
            LiveEvent::Status { status } if !greeted => {
                greeted = true;
                let _ = writeln!(
                    notes,
                    "edgeferry tail: following gateway {} (edgeferry {}) at {addr}{}; readings are \
                     sampled (at most {READINGS_PER_SERIES_PER_SEC}/s per series); Ctrl-C to stop",
                    status.gateway,
                    status.version,
                    pattern
                        .map(|p| format!(", series matching {p:?}"))
                        .unwrap_or_default(),
                );
            }
            LiveEvent::Lagged { missed } => {
                let _ = writeln!(
                    notes,
                    "edgeferry tail: missed {missed} events (this terminal fell behind the feed)"
                );
            }
            _ => {}
        }
        if let (Some(p), Some(s)) = (pattern, ev.series())
            && !glob_match(p, s)
        {
            continue;
        }
        if let Some(line) = format_event(&ev)
            && writeln!(out, "{line}").is_err()
        {
            // The reader went away (`edgeferry tail | head`): a normal end.
            let _ = ws.close(None).await;
            return Ok(TailEnd::Stopped);
        }
    }
}

/// One human line for a reading, window or alert (none for status and lag notices):
/// `<time>  <kind>  <series>  <what>`, times in UTC.
pub fn format_event(ev: &LiveEvent) -> Option<String> {
    let t = crate::util::rfc3339_ms;
    Some(match ev {
        LiveEvent::Reading {
            series,
            value,
            time_ms,
            ..
        } => format!("{}  reading  {series}  {value}", t(*time_ms)),
        LiveEvent::Window {
            series,
            window_start_ms,
            window_secs,
            version,
            count,
            mean,
            min,
            max,
        } => format!(
            "{}  window   {series}  {window_secs}s n={count} mean={} min={} max={}{}",
            t(*window_start_ms),
            short(*mean),
            short(*min),
            short(*max),
            if *version > 1 {
                format!(" (correction v{version})")
            } else {
                String::new()
            }
        ),
        LiveEvent::Alert {
            rule,
            series,
            state,
            value,
            time_ms,
        } => format!(
            "{}  ALERT    {series}  {rule} {}{}",
            t(*time_ms),
            match state {
                AlertState::Raised => "RAISED",
                AlertState::Cleared => "cleared",
            },
            value.map(|v| format!(" value={v}")).unwrap_or_default()
        ),
        LiveEvent::Status { .. } | LiveEvent::Lagged { .. } => return None,
    })
}

/// At most four decimals, without trailing zeros.
fn short(v: f64) -> String {
    let s = format!("{v:.4}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(metric: &str, device: &str, value: f64) -> Reading {
        let mut tags = BTreeMap::new();
        tags.insert("device".to_string(), device.to_string());
        Reading {
            metric: metric.into(),
            tags,
            value,
            time_ms: 1,
        }
    }

    #[test]
    fn glob_matches_whole_keys_with_wildcards() {
        assert!(glob_match("temp*", "temp{device=d1}"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("*", ""));
        assert!(glob_match("*d1*", "temp{device=d1,site=a}"));
        assert!(!glob_match("*d2*", "temp{device=d1,site=a}"));
        assert!(glob_match("temp", "temp"));
        assert!(!glob_match("temp", "temperature"));
        assert!(glob_match("t?mp*", "temp{x=1}"));
        assert!(glob_match("a*b*c", "aXbYbZc"));
        assert!(!glob_match("a*b*c", "aXbYbZ"));
        assert!(glob_match("**x", "yyx"));
    }

    #[test]
    fn events_format_as_one_human_line() {
        let r = LiveEvent::Reading {
            series: "temp{device=d1}".into(),
            metric: "temp".into(),
            tags: BTreeMap::new(),
            value: 21.5,
            time_ms: 1_700_000_000_123,
        };
        assert_eq!(
            format_event(&r).unwrap(),
            "2023-11-14T22:13:20.123Z  reading  temp{device=d1}  21.5"
        );
        let w = LiveEvent::Window {
            series: "temp".into(),
            window_start_ms: 1_700_000_000_000,
            window_secs: 60,
            version: 2,
            count: 3,
            mean: 2.0 / 3.0,
            min: 0.0,
            max: 1.0,
        };
        assert_eq!(
            format_event(&w).unwrap(),
            "2023-11-14T22:13:20Z  window   temp  60s n=3 mean=0.6667 min=0 max=1 (correction v2)"
        );
        let a = LiveEvent::Alert {
            rule: "hot".into(),
            series: "temp".into(),
            state: AlertState::Raised,
            value: Some(40.0),
            time_ms: 0,
        };
        assert_eq!(
            format_event(&a).unwrap(),
            "1970-01-01T00:00:00Z  ALERT    temp  hot RAISED value=40"
        );
        assert!(format_event(&LiveEvent::Lagged { missed: 1 }).is_none());
    }

    #[test]
    fn events_serialize_with_a_type_tag() {
        let e = LiveEvent::Window {
            series: "t".into(),
            window_start_ms: 0,
            window_secs: 60,
            version: 1,
            count: 3,
            mean: 2.0,
            min: 1.0,
            max: 3.0,
        };
        let j = serde_json::to_value(&e).unwrap();
        assert_eq!(j["type"], "window");
        assert_eq!(j["count"], 3);
        let back: LiveEvent = serde_json::from_value(j.clone()).unwrap();
        assert_eq!(serde_json::to_value(&back).unwrap(), j);
        let lag = serde_json::to_string(&LiveEvent::Lagged { missed: 4 }).unwrap();
        assert_eq!(lag, r#"{"type":"lagged","missed":4}"#);
    }

    #[test]
    fn sampler_limits_per_series_and_in_all_and_sends_nothing_unasked() {
        let feed = LiveFeed::new(4096);
        let mut s = ReadingSampler::new(feed.clone());
        assert!(!s.active());
        let mut rx = feed.subscribe();
        assert!(s.active());
        let a: Vec<_> = (0..50).map(|i| reading("t", "a", i as f64)).collect();
        let b: Vec<_> = (0..50).map(|i| reading("t", "b", i as f64)).collect();
        s.offer(1_000, a.iter().chain(&b));
        let mut got = Vec::new();
        while let Ok(e) = rx.try_recv() {
            got.push(e);
        }
        assert_eq!(got.len(), 2 * READINGS_PER_SERIES_PER_SEC as usize);
        // The next second has a fresh budget.
        s.offer(1_999, a.iter());
        assert!(rx.try_recv().is_err());
        s.offer(2_000, a.iter());
        assert!(rx.try_recv().is_ok());
        // The overall budget holds across many series.
        let many: Vec<_> = (0..5000)
            .map(|i| reading("t", &i.to_string(), 0.0))
            .collect();
        let mut rx = feed.subscribe();
        s.offer(3_000, many.iter());
        let mut n = 0;
        while rx.try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(n, READINGS_PER_SEC as usize);
    }

    #[test]
    fn sending_without_receivers_or_to_a_full_feed_never_fails() {
        let feed = LiveFeed::new(2);
        feed.send(LiveEvent::Lagged { missed: 1 });
        let mut rx = feed.subscribe();
        for i in 0..10 {
            feed.send(LiveEvent::Lagged { missed: i });
        }
        assert!(matches!(
            rx.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(8))
        ));
        assert!(matches!(rx.try_recv(), Ok(LiveEvent::Lagged { missed: 8 })));
    }
}
