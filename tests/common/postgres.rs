//! A real PostgreSQL server (Debian's, `initdb` + `postgres` run as the `postgres` user: they
//! refuse root) on an ephemeral loopback port with its own data directory, stopped by its
//! own PID.

use super::{free_port, wait_for};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tempfile::TempDir;

pub struct Postgres {
    child: Option<Child>,
    pub dir: TempDir,
    pub port: u16,
}

/// `/usr/lib/postgresql/<newest>/bin`.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed: apt-get install postgresql (the README's test command does)")
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("no PostgreSQL version in /usr/lib/postgresql")
        .1
}

/// uid and gid of the `postgres` user.
fn postgres_user() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .expect("no postgres user (apt-get install postgresql creates it)");
    let f: Vec<&str> = line.split(':').collect();
    (f[2].parse().unwrap(), f[3].parse().unwrap())
}

impl Postgres {
    pub fn start() -> Postgres {
        Postgres::start_on(free_port())
    }

    /// On a port chosen beforehand (a loader given the URL before the server is up).
    pub fn start_on(port: u16) -> Postgres {
        let (uid, gid) = postgres_user();
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        let bin = bin_dir();
        let out = Command::new(bin.join("initdb"))
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(dir.path().join("data"))
            .uid(uid)
            .gid(gid)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let log = std::fs::File::create(dir.path().join("postgres.log")).unwrap();
        let child = Command::new(bin.join("postgres"))
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-p", &port.to_string(), "-k"])
            .arg(dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=40",
            ])
            .uid(uid)
            .gid(gid)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let pg = Postgres {
            child: Some(child),
            dir,
            port,
        };
        wait_for(
            "PostgreSQL to accept connections",
            Duration::from_secs(30),
            || {
                std::fs::read_to_string(pg.dir.path().join("postgres.log"))
                    .is_ok_and(|l| l.contains("ready to accept connections"))
            },
        );
        pg
    }

    pub fn url(&self) -> String {
        url(self.port)
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    }
}

/// The URL of the server on `port` (it need not be up).
pub fn url(port: u16) -> String {
    format!("postgres://postgres@127.0.0.1:{port}/postgres")
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Immediate shutdown of the server and its backends.
            super::signal(c.id(), "QUIT");
            let _ = c.wait();
        }
    }
}
