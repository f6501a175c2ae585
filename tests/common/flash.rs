//! The flash-wear scenario shared by `tests/flash_wear.rs` and `benches/flash.rs`: the example
//! config's shape, independent sensors publishing 52-byte JSON readings, and the kernel's
//! count of what a process wrote.

use super::{Gateway, Publisher, now_ms};
use std::time::{Duration, Instant};

/// A 52-byte JSON reading (the size the issue measured with) of `sensor` at `ts`.
pub fn payload(sensor: usize, value: Option<f64>, ts: u64) -> String {
    let v = value.unwrap_or(20.0 + (sensor % 40) as f64 + (sensor % 100) as f64 / 100.0);
    let p = format!(r#"{{"value":{v:.2},"ts":{ts},"unit":"C"}}"#);
    format!("{p:<52}")
}

/// Bytes process `pid` caused to be written to storage (`write_bytes` of `/proc/PID/io`).
pub fn proc_write_bytes(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// The example config's shape (windows 10 s and 1 min, lateness 5 s, correction horizon
/// 2 min, the `overheat` rule, an upstream) with the commit and checkpoint keys left at their
/// defaults, for a gateway `id` on `mqtt` forwarding to `upstream`.
pub fn example_shaped(gw: &Gateway, id: &str, mqtt: &str, upstream: &str) -> String {
    format!(
        r#"
[gateway]
id = "{id}"
data_dir = "{data}"

[mqtt]
url = "{mqtt}"

[[mqtt.subscribe]]
filter = "sensors/#"
template = "sensors/{{site}}/{{device}}/{{metric}}"
format = "json"
value = "value"
timestamp = "ts"

[process]
windows = ["10s", "1m"]
allowed_lateness = "5s"
correction_horizon = "2m"
max_series = 20000

[[rules]]
name = "overheat"
metric = "temperature"
above = 80.0
clear_below = 75.0
publish = "alerts/{{site}}/{{device}}/{{rule}}"

[upstream]
url = "{upstream}"

[admin]
listen = "127.0.0.1:0"
"#,
        data = gw.dir.path().join("data").display(),
    )
}

/// The topic of sensor `s`.
pub fn topic(s: usize) -> String {
    format!("sensors/site{}/dev{s}/temperature", s % 4)
}

/// `sensors` independent sensors each publishing at `hz` for `secs`: the readings arrive
/// spread evenly over each period (in 1 ms steps), as from sensors on their own clocks (bursts
/// would let one sync cover hundreds of readings). `value(n)` may set the value of reading `n`
/// (e.g. to cross a rule). Returns (readings, payload bytes).
pub fn publish_evenly(
    p: &Publisher,
    sensors: usize,
    hz: u64,
    secs: u64,
    mut value: impl FnMut(u64) -> Option<f64>,
) -> (usize, usize) {
    let rate = sensors as u64 * hz;
    let total = rate * secs;
    let t0 = Instant::now();
    let (mut n, mut bytes) = (0u64, 0usize);
    while n < total {
        let due = ((t0.elapsed().as_micros() as u64 * rate) / 1_000_000 + 1).min(total);
        while n < due {
            let s = (n % sensors as u64) as usize;
            let body = payload(s, value(n), now_ms());
            bytes += body.len();
            p.publish(&topic(s), body);
            n += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    (total as usize, bytes)
}
