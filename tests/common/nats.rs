//! A real `nats-server` with JetStream on an ephemeral loopback port and its own store
//! directory, stopped by its own PID (SIGKILL to test a crash, then started again on the
//! same port and store).

use super::{free_port, wait_for};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tempfile::TempDir;

pub struct NatsServer {
    child: Option<Child>,
    pub dir: TempDir,
    pub port: u16,
    /// Extra arguments (cluster membership).
    args: Vec<String>,
    /// Its JetStream file storage (`max_file_store`).
    grant: &'static str,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        NatsServer::start_on(free_port())
    }

    /// A server granting `grant` of file storage (benchmarks keep the collector's default
    /// 10 GiB stream, so they give it room: [`BENCH_GRANT`]).
    pub fn start_granting(grant: &'static str) -> NatsServer {
        let mut n = NatsServer::unstarted(free_port());
        n.grant = grant;
        n.start_again();
        n
    }

    fn unstarted(port: u16) -> NatsServer {
        NatsServer {
            child: None,
            dir: tempfile::tempdir().unwrap(),
            port,
            args: Vec::new(),
            grant: MAX_FILE_STORE,
        }
    }

    /// On a port chosen beforehand (a collector given the URL before the engine is up).
    pub fn start_on(port: u16) -> NatsServer {
        let mut n = NatsServer::unstarted(port);
        n.start_again();
        n
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The collector's `--sink` for this server: [`Self::url`] with a stream of
    /// [`TEST_STREAM_BYTES`], which fits in the [`MAX_FILE_STORE`] every test server grants.
    pub fn sink(&self) -> String {
        sink_url(&self.url())
    }

    pub fn start_again(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("nats.log"))
            .unwrap();
        // A fixed grant, not nats-server's default of 75% of the free disk: the tests then
        // behave the same on a small CI disk as on a big one, and a collector asking for
        // its default 10 GiB stream fails here too, with the message an operator would get.
        let conf = self.dir.path().join("nats.conf");
        std::fs::write(
            &conf,
            format!("jetstream {{ max_file_store: {} }}\n", self.grant),
        )
        .unwrap();
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&conf)
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(self.dir.path().join("js"))
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start nats-server ({e}): apt-get install nats-server (the README's test command does)")
            });
        self.child = Some(child);
        let port = self.port;
        wait_for("nats-server to listen", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        super::read_all(&self.dir.path().join("nats.log"))
    }
}

/// The JetStream file storage every test nats-server grants.
pub const MAX_FILE_STORE: &str = "1GiB";

/// What the benchmarks' servers grant: room for the collector's default 10 GiB stream.
pub const BENCH_GRANT: &str = "12GiB";

/// The stream size the tests' collectors ask for (`?max_bytes=`).
pub const TEST_STREAM_BYTES: &str = "128MiB";

/// `url` with the tests' stream size, as a collector's `--sink`.
pub fn sink_url(url: &str) -> String {
    format!("{url}?max_bytes={TEST_STREAM_BYTES}")
}

/// A JetStream cluster of `n` nodes on loopback (each its own store directory), for R3
/// streams; nodes can be SIGKILLed and started again one by one.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    pub fn start(n: usize) -> NatsCluster {
        NatsCluster::start_granting(n, MAX_FILE_STORE)
    }

    /// `n` nodes, each granting `grant` of file storage.
    pub fn start_granting(n: usize, grant: &'static str) -> NatsCluster {
        let cluster_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes = cluster_ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = Vec::new();
        for (i, cp) in cluster_ports.iter().enumerate() {
            let mut node = NatsServer::unstarted(free_port());
            node.grant = grant;
            node.args = vec![
                "--name".into(),
                format!("n{i}"),
                "--cluster_name".into(),
                "edgeferry-test".into(),
                "--cluster".into(),
                format!("nats://127.0.0.1:{cp}"),
                "--routes".into(),
                routes.clone(),
            ];
            node.start_again();
            nodes.push(node);
        }
        NatsCluster { nodes }
    }

    /// `nats://127.0.0.1:P1,127.0.0.1:P2,…`: every node, as collectors and loaders take it.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("nats://{}", hosts.join(","))
    }

    /// [`Self::url`] as a collector's `--sink`.
    pub fn sink(&self) -> String {
        sink_url(&self.url())
    }

    /// Waits until JetStream has a meta leader (the cluster can create streams).
    pub async fn wait_ready(&self) {
        wait_for(
            "the NATS cluster to elect a JetStream leader",
            Duration::from_secs(60),
            || {
                self.nodes
                    .iter()
                    .any(|n| n.log().contains("metadata leader"))
            },
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Every aggregate line in the stream, and how many messages carried each batch id.
pub async fn stream_contents(
    nats: &NatsServer,
) -> (
    Vec<serde_json::Value>,
    std::collections::BTreeMap<String, usize>,
) {
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("EDGEFERRY").await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let (mut lines, mut ids) = (Vec::new(), std::collections::BTreeMap::new());
    for seq in state.first_sequence..=state.last_sequence {
        let Ok(m) = stream.get_raw_message(seq).await else {
            continue;
        };
        let h = |k: &str| m.headers.get(k).map(|v| v.to_string()).unwrap_or_default();
        *ids.entry(format!("{}/{}", h("Edgeferry-Epoch"), h("Edgeferry-Batch")))
            .or_default() += 1;
        for l in std::str::from_utf8(&m.payload).unwrap().lines() {
            lines.push(serde_json::from_str(l).unwrap());
        }
    }
    (lines, ids)
}

/// Waits (up to 60 s) until the stream's aggregates count `n` readings in both window lengths
/// of a `["1s", "2s"]` gateway; then [`stream_contents`].
pub async fn wait_for_readings(
    nats: &NatsServer,
    n: u64,
) -> (
    Vec<serde_json::Value>,
    std::collections::BTreeMap<String, usize>,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (lines, ids) = stream_contents(nats).await;
        let counts = super::central_counts(&lines);
        if counts.values().all(|&c| c >= n) && counts.len() == 2
            || std::time::Instant::now() > deadline
        {
            return (lines, ids);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
