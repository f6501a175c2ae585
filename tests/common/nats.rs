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
}

impl NatsServer {
    pub fn start() -> NatsServer {
        NatsServer::start_on(free_port())
    }

    /// On a port chosen beforehand (a collector given the URL before the engine is up).
    pub fn start_on(port: u16) -> NatsServer {
        let mut n = NatsServer {
            child: None,
            dir: tempfile::tempdir().unwrap(),
            port,
        };
        n.start_again();
        n
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn start_again(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("nats.log"))
            .unwrap();
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(self.dir.path().join("js"))
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
