//! A real `edgeferry load` process between a test's nats-server and PostgreSQL, stopped by
//! its own PID (SIGKILL to test a crash, then started again with the same arguments).

use super::nats::NatsServer;
use super::postgres::Postgres;
use std::process::{Child, Command, Stdio};
use tempfile::TempDir;

pub struct Loader {
    child: Option<Child>,
    pub dir: TempDir,
    args: Vec<String>,
}

impl Loader {
    /// `edgeferry load --from <nats> --to <pg> <extra…>`, running.
    pub fn start(nats: &NatsServer, pg: &Postgres, extra: &[&str]) -> Loader {
        Loader::start_to(nats, &pg.url(), extra)
    }

    /// The same with a database URL of the test's choosing (one nothing listens on yet).
    pub fn start_to(nats: &NatsServer, db_url: &str, extra: &[&str]) -> Loader {
        Loader::start_urls(&nats.url(), db_url, extra)
    }

    /// `edgeferry load --from <from> --to <db_url> <extra…>` (e.g. a cluster's URL list).
    pub fn start_urls(from: &str, db_url: &str, extra: &[&str]) -> Loader {
        let mut args = vec![
            "load".to_string(),
            "--from".into(),
            from.to_string(),
            "--to".into(),
            db_url.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut l = Loader {
            child: None,
            dir: tempfile::tempdir().unwrap(),
            args,
        };
        l.spawn();
        l
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Starts the process again (after `kill9`) with the same arguments; the log appends.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("load.log"))
            .unwrap();
        self.child = Some(
            Command::new(env!("CARGO_BIN_EXE_edgeferry"))
                .args(&self.args)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            super::signal(c.id(), "KILL");
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        super::read_all(&self.dir.path().join("load.log"))
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.kill9();
    }
}
