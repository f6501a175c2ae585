//! The live view: the `/live` WebSocket, `edgeferry tail` and the dashboard at `/` (also
//! rendered by a real headless Chromium when `/usr/bin/chromium` is installed).

mod common;

use common::*;
use futures_util::StreamExt;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::{self, Message};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const TEMPERATURE: &str = "temperature{device=d1,site=a}";
const HUMIDITY: &str = "humidity{device=d1,site=a}";

fn admin_addr(gw: &Gateway) -> String {
    std::fs::read_to_string(gw.dir.path().join("data/admin.addr"))
        .unwrap()
        .trim()
        .to_string()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn connect(addr: &str) -> Result<Ws, tungstenite::Error> {
    tokio_tungstenite::connect_async(format!("ws://{addr}/live"))
        .await
        .map(|(ws, _)| ws)
}

/// The next JSON message that satisfies `want`, within `timeout`.
async fn next_matching(
    ws: &mut Ws,
    timeout: Duration,
    what: &str,
    want: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("timed out after {timeout:?} waiting for {what}"))
            .expect("the feed ended")
            .expect("the feed failed");
        if let Message::Text(t) = m {
            let j: serde_json::Value = serde_json::from_str(&t).unwrap();
            if want(&j) {
                return j;
            }
        }
    }
}

#[test]
fn live_websocket_sends_a_snapshot_then_committed_readings_and_bounds_its_clients() {
    let broker = Mosquitto::start();
    let mut gw = Gateway::new(&broker.url());
    gw.start();
    let addr = admin_addr(&gw);
    let rt = runtime();
    let p = Publisher::connect(broker.port, "pub-live");

    let mut ws = rt.block_on(connect(&addr)).unwrap();
    let first = rt.block_on(next_matching(
        &mut ws,
        Duration::from_secs(5),
        "the snapshot",
        |_| true,
    ));
    assert_eq!(first["type"], "status", "the snapshot comes first: {first}");
    assert_eq!(first["status"]["gateway"], "gw-test");
    assert_eq!(first["status"]["ready"], true);

    let ts = now_ms();
    p.publish(
        "sensors/a/d1/temperature",
        format!(r#"{{"value":42.5,"ts":{ts}}}"#),
    );
    let ev = rt.block_on(next_matching(
        &mut ws,
        Duration::from_secs(10),
        "the reading event",
        |j| j["type"] == "reading",
    ));
    assert_eq!(ev["series"], TEMPERATURE, "{ev}");
    assert_eq!(ev["metric"], "temperature");
    assert_eq!(ev["tags"]["device"], "d1");
    assert_eq!(ev["value"], 42.5);
    assert_eq!(ev["time_ms"], ts);

    // A status snapshot every second, showing the reading counted.
    let s = rt.block_on(next_matching(
        &mut ws,
        Duration::from_secs(5),
        "a status snapshot counting the reading",
        |j| j["type"] == "status" && j["status"]["ingest"]["readings"] == 1,
    ));
    assert!(s["status"]["uptime_secs"].is_u64());

    // At most 16 clients: the 17th is refused with 503, and a place frees when one leaves.
    let mut others: Vec<Ws> = (1..edgeferry::admin::MAX_LIVE_CLIENTS)
        .map(|_| {
            rt.block_on(connect(&addr))
                .expect("a client within the bound")
        })
        .collect();
    match rt.block_on(connect(&addr)) {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503),
        Err(e) => panic!("expected HTTP 503, got {e}"),
        Ok(_) => panic!("a 17th client was accepted"),
    }
    let mut leaving = others.pop().unwrap();
    rt.block_on(leaving.close(None)).unwrap();
    drop(leaving);
    let start = Instant::now();
    let again = loop {
        match rt.block_on(connect(&addr)) {
            Ok(ws) => break ws,
            Err(_) if start.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("the place of a client that left was not freed: {e}"),
        }
    };
    drop(again);
    drop(others);

    let (code, metrics) =
        edgeferry::admin::http_get(&addr, "/metrics", Duration::from_secs(3)).unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("edgeferry_live_events_lagged_total"),
        "{metrics}"
    );
    drop(ws);
    assert!(gw.stop().success(), "{}", gw.current_log());
}

/// A child process (`edgeferry tail`) whose stdout and stderr are collected as they come.
struct Tail {
    child: Child,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
}

impl Tail {
    fn spawn(gw: &Gateway, args: &[&str]) -> Tail {
        let mut child = Command::new(env!("CARGO_BIN_EXE_edgeferry"))
            .arg("tail")
            .arg("-c")
            .arg(&gw.config)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let collect = |r: Box<dyn std::io::Read + Send>| {
            let buf = Arc::new(Mutex::new(String::new()));
            let b = buf.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines() {
                    let Ok(line) = line else { break };
                    let mut b = b.lock().unwrap();
                    b.push_str(&line);
                    b.push('\n');
                }
            });
            buf
        };
        let out = collect(Box::new(child.stdout.take().unwrap()));
        let err = collect(Box::new(child.stderr.take().unwrap()));
        Tail { child, out, err }
    }

    fn out(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    fn err(&self) -> String {
        self.err.lock().unwrap().clone()
    }

    fn wait_connected(&mut self) {
        let start = Instant::now();
        while !self.err().contains("following gateway gw-test") {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("edgeferry tail exited early ({st}): {}", self.err());
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "edgeferry tail did not connect: {}",
                self.err()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGINT (Ctrl-C) by PID; returns whether it exited with status 0 within 5 s.
    fn interrupt(&mut self) -> bool {
        signal(self.child.id(), "INT");
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn tail_prints_readings_as_they_happen_and_filters_series() {
    let broker = Mosquitto::start();
    let mut gw = Gateway::new(&broker.url());
    gw.start();
    let p = Publisher::connect(broker.port, "pub-tail");
    let mut all = Tail::spawn(&gw, &[]);
    let mut temps = Tail::spawn(&gw, &["--series", "temperature*"]);
    all.wait_connected();
    temps.wait_connected();
    assert!(
        temps.err().contains("series matching \"temperature*\""),
        "{}",
        temps.err()
    );

    // Humidity first: once the temperature line is out, the humidity one was sent before it.
    p.publish("sensors/a/d1/humidity", live_payload(55));
    p.publish("sensors/a/d1/temperature", live_payload(21));
    p.wait_acked(2, Duration::from_secs(10));
    wait_for(
        "both readings in the unfiltered tail",
        Duration::from_secs(10),
        || {
            let o = all.out();
            o.contains(&format!("reading  {HUMIDITY}  55"))
                && o.contains(&format!("reading  {TEMPERATURE}  21"))
        },
    );
    wait_for(
        "the temperature reading in the filtered tail",
        Duration::from_secs(10),
        || temps.out().contains(&format!("reading  {TEMPERATURE}  21")),
    );
    let filtered = temps.out();
    assert!(
        !filtered.contains("humidity"),
        "--series let another series through:\n{filtered}"
    );
    // One line per event, starting with an RFC 3339 time.
    for line in all.out().lines() {
        assert!(line.starts_with("20") && line.contains('T'), "{line}");
    }

    assert!(
        temps.interrupt(),
        "Ctrl-C ends tail with status 0: {}",
        temps.err()
    );
    // The daemon stops with a client connected; the client is told why and exits 0.
    assert!(gw.stop().success(), "{}", gw.current_log());
    let start = Instant::now();
    let st = loop {
        if let Ok(Some(st)) = all.child.try_wait() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "tail did not notice the daemon stopping"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(st.success(), "{st}: {}", all.err());
    assert!(
        all.err()
            .contains("the daemon closed the feed: edgeferry is shutting down"),
        "{}",
        all.err()
    );
}

#[test]
fn tail_reports_an_unreachable_daemon_with_exit_code_2() {
    let gw = Gateway::new("mqtt://127.0.0.1:1");
    let (st, out, err) = gw.command(&["tail"]);
    assert_eq!(st.code(), Some(2), "{out}{err}");
    assert!(
        err.contains("cannot connect to the daemon's live feed"),
        "{err}"
    );
    assert!(err.contains("is it running?"), "{err}");
}

#[test]
fn dashboard_is_one_self_contained_page() {
    let broker = Mosquitto::start();
    let mut gw = Gateway::new(&broker.url());
    gw.start();
    let addr = admin_addr(&gw);
    let (code, page) = edgeferry::admin::http_get(&addr, "/", Duration::from_secs(3)).unwrap();
    assert_eq!(code, 200);
    assert!(
        page.contains("<title>edgeferry live dashboard</title>"),
        "{page}"
    );
    assert!(page.contains("/live"), "the page follows the live feed");
    assert!(page.contains("<style>") && page.contains("<script>"));
    for external in ["http://", "https://", "<link", "src=\"", "@import", "url("] {
        assert!(
            !page.contains(external),
            "the dashboard refers to something external ({external})"
        );
    }
    assert!(gw.stop().success());
}

/// Publishes live readings of three sensors ten times a second until dropped.
struct Feeder {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Feeder {
    fn start(port: u16) -> Feeder {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let p = Publisher::connect(port, "pub-dashboard");
            let mut i = 0usize;
            while !s.load(Ordering::Relaxed) {
                let t = i as f64 / 5.0;
                let temp = 21.0 + 2.0 * t.sin();
                let hum = 55.0 + 5.0 * (t / 2.0).cos();
                let ts = now_ms();
                p.publish(
                    "sensors/a/d1/temperature",
                    format!(r#"{{"value":{temp:.2},"ts":{ts}}}"#),
                );
                p.publish(
                    "sensors/a/d1/humidity",
                    format!(r#"{{"value":{hum:.2},"ts":{ts}}}"#),
                );
                p.publish(
                    "sensors/b/d7/pressure",
                    format!(r#"{{"value":{:.1},"ts":{ts}}}"#, 1013.0 + (i % 7) as f64),
                );
                i += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Feeder {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const CHROMIUM: &str = "/usr/bin/chromium";

/// Headless Chromium, driven over the DevTools protocol on its browser WebSocket so the test
/// waits in real time for the page to fill itself from `/live`. (One-shot `--dump-dom` and
/// `--screenshot` with `--virtual-time-budget` do not wait for WebSocket traffic: virtual time
/// runs ahead and the page is captured before events arrive.) Killed by its PID when dropped.
struct Chromium {
    child: Child,
    /// The browser's DevTools WebSocket URL.
    devtools: String,
}

impl Chromium {
    fn launch(dir: &Path) -> Chromium {
        let profile = dir.join("profile");
        let stderr = dir.join("chromium.err");
        let mut child = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--window-size=1280,900",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        // Chromium writes "<port>\n<browser path>" once it listens.
        let port_file = profile.join("DevToolsActivePort");
        let start = Instant::now();
        let devtools = loop {
            let s = read_all(&port_file);
            let mut l = s.lines();
            if let (Some(port), Some(path)) = (l.next(), l.next()) {
                break format!("ws://127.0.0.1:{port}{path}");
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!("chromium exited ({st}): {}", read_all(&stderr));
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("chromium did not start: {}", read_all(&stderr));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Chromium { child, devtools }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One page of the browser, attached with a flat DevTools session.
struct Page {
    ws: Ws,
    session: String,
    next_id: u64,
}

impl Page {
    /// Opens a 1280×900 page on `url`.
    async fn open(devtools: &str, url: &str) -> Page {
        let (ws, _) = tokio_tungstenite::connect_async(devtools)
            .await
            .expect("cannot reach chromium's DevTools endpoint");
        let mut p = Page {
            ws,
            session: String::new(),
            next_id: 0,
        };
        let target = p
            .call(
                "Target.createTarget",
                serde_json::json!({"url": "about:blank"}),
            )
            .await;
        let attached = p
            .call(
                "Target.attachToTarget",
                serde_json::json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        p.session = attached["sessionId"].as_str().unwrap().to_string();
        p.call(
            "Emulation.setDeviceMetricsOverride",
            serde_json::json!({"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;
        p.call("Page.navigate", serde_json::json!({"url": url}))
            .await;
        p
    }

    /// Calls a DevTools method (on the page once attached) and returns its result.
    async fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        use futures_util::SinkExt;
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = serde_json::json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            msg["sessionId"] = self.session.clone().into();
        }
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .await
            .unwrap();
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method}"))
                .expect("DevTools connection closed")
                .expect("DevTools connection failed");
            if let Message::Text(t) = m {
                let j: serde_json::Value = serde_json::from_str(&t).unwrap();
                if j["id"] == id {
                    assert!(j.get("error").is_none(), "{method}: {}", j["error"]);
                    return j["result"].clone();
                }
            }
        }
    }

    async fn dom(&mut self) -> String {
        let r = self
            .call(
                "Runtime.evaluate",
                serde_json::json!({
                    "expression": "document.documentElement.outerHTML",
                    "returnByValue": true,
                }),
            )
            .await;
        r["result"]["value"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    async fn screenshot_png(&mut self) -> Vec<u8> {
        use base64::Engine;
        let r = self
            .call(
                "Page.captureScreenshot",
                serde_json::json!({"format": "png"}),
            )
            .await;
        base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap()
    }
}

/// The number in `<... id="ID">N</...>` of a DOM.
fn number_in(dom: &str, id: &str) -> Option<f64> {
    let at = dom.find(&format!("id=\"{id}\">"))? + id.len() + 6;
    let rest = &dom[at..];
    rest[..rest.find('<')?].trim().parse().ok()
}

#[test]
fn dashboard_renders_live_data_in_headless_chromium() {
    if !Path::new(CHROMIUM).exists() {
        eprintln!("SKIPPED: {CHROMIUM} is not installed (apt-get install chromium)");
        return;
    }
    let broker = Mosquitto::start();
    // Short windows and a rule the feeder's temperature crosses: windows and alerts show too.
    let mut gw = Gateway::with_config(
        &broker.url(),
        "",
        r#"
[process]
windows = ["2s"]
allowed_lateness = "1s"

[[rules]]
name = "warm"
metric = "temperature"
above = 22.5
clear_below = 22.0
publish = "alerts/{site}/{device}/{rule}"
"#,
    );
    gw.start();
    let addr = admin_addr(&gw);
    let feeder = Feeder::start(broker.port);
    wait_for("readings to be committed", Duration::from_secs(10), || {
        edgeferry::admin::http_get(&addr, "/status", Duration::from_secs(3))
            .map(|(_, b)| !b.contains("\"readings\":0"))
            .unwrap_or(false)
    });
    let tmp = tempfile::tempdir().unwrap();
    let browser = Chromium::launch(tmp.path());
    let rt = runtime();
    let mut page = rt.block_on(Page::open(&browser.devtools, &format!("http://{addr}/")));

    // The page fills itself from the WebSocket: header, counters, sensors with sparklines.
    let pressure = "pressure{device=d7,site=b}";
    let start = Instant::now();
    let dom = loop {
        let dom = rt.block_on(page.dom());
        let filled = dom.contains("gw-test")
            && number_in(&dom, "readings-total").is_some_and(|n| n > 0.0)
            && number_in(&dom, "rate").is_some_and(|n| n > 0.0)
            && dom.contains(TEMPERATURE)
            && dom.contains(pressure)
            && dom.contains("<polyline")
            && dom.contains("2s: n=");
        if filled || start.elapsed() > Duration::from_secs(20) {
            break dom;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(dom.contains("gw-test"), "gateway id not filled in:\n{dom}");
    let total = number_in(&dom, "readings-total");
    assert!(
        total.is_some_and(|n| n > 0.0),
        "no readings count ({total:?}):\n{dom}"
    );
    let rate = number_in(&dom, "rate");
    assert!(
        rate.is_some_and(|n| n > 0.0),
        "no readings/s ({rate:?}):\n{dom}"
    );
    assert!(
        dom.contains(TEMPERATURE) && dom.contains(HUMIDITY) && dom.contains(pressure),
        "sensors not listed:\n{dom}"
    );
    assert!(dom.contains("<polyline"), "no sparkline drawn:\n{dom}");
    assert!(dom.contains("2s: n="), "no closed window shown:\n{dom}");
    assert!(
        dom.contains(">live</span>"),
        "the page does not show its feed as live:\n{dom}"
    );

    // Let the sparklines (5 sampled points a second) and the alert list fill up a little,
    // then take the picture.
    let opened = Instant::now();
    while opened.elapsed() < Duration::from_secs(15)
        && (opened.elapsed() < Duration::from_secs(6)
            || !rt.block_on(page.dom()).contains("warm</b>"))
    {
        std::thread::sleep(Duration::from_millis(250));
    }
    let png = rt.block_on(page.screenshot_png());
    drop(page);
    drop(browser);
    drop(feeder);
    let shot = tmp.path().join("dashboard.png");
    std::fs::write(&shot, &png).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(
        png.len() > 20_000,
        "suspiciously small screenshot: {} bytes",
        png.len()
    );
    if let Ok(keep) = std::env::var("EDGEFERRY_SCREENSHOT_OUT") {
        std::fs::copy(&shot, &keep).unwrap();
        eprintln!("screenshot saved to {keep}");
    }
    assert!(gw.stop().success(), "{}", gw.current_log());
}
