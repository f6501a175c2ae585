//! The `edgeferry` binary: parses the command line, installs the TLS crypto provider and hands
//! over to [`edgeferry::cli`], which prints and picks the exit code (0 clean stop, 1
//! configuration error, 2 runtime failure, 3 unhealthy or damage found).

use clap::{Parser, Subcommand};
use edgeferry::cli::{self, Exit};
use std::path::PathBuf;
use std::process::ExitCode;

/// edgeferry: MQTT sensor readings → durable journal → local aggregates and alerts →
/// store-and-forward upstream.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start and matched at once: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon in the foreground (under systemd: Type=notify).
    Run {
        /// Configuration file (TOML; `EDGEFERRY__SECTION__KEY` environment variables override it).
        #[arg(short, long, default_value = "/etc/edgeferry/config.toml")]
        config: PathBuf,
    },
    /// Load and validate a configuration; print the effective configuration or every problem.
    CheckConfig {
        /// Configuration file to check, with environment overrides applied as `run` would.
        #[arg(short, long, default_value = "/etc/edgeferry/config.toml")]
        config: PathBuf,
    },
    /// Ask the running daemon how it is doing; exit code 0 healthy, 3 unhealthy or degraded
    /// (readings lost recently), 2 unreachable.
    Status {
        /// Configuration file (its admin.listen and gateway.data_dir are read).
        #[arg(short, long, default_value = "/etc/edgeferry/config.toml")]
        config: PathBuf,
        /// Print the raw JSON report instead.
        #[arg(long)]
        json: bool,
    },
    /// Follow the running daemon live: one line per reading (sampled: at most a few per
    /// second per series), closed window and alert, as they happen. Ctrl-C stops; exit code
    /// 2 when the daemon is unreachable.
    Tail {
        /// Configuration file (its admin.listen and gateway.data_dir are read).
        #[arg(short, long, default_value = "/etc/edgeferry/config.toml")]
        config: PathBuf,
        /// Only series whose key matches this pattern; `*` matches anything, `?` one
        /// character, and the whole key must match, e.g. 'temperature*' or '*device=d1*'.
        #[arg(long, value_name = "PATTERN")]
        series: Option<String>,
    },
    /// Run the central receiver: accept gateways over WebSocket(+TLS), and/or subscribe to
    /// the batches they publish to an MQTT broker (--mqtt), and make the batches durable in
    /// the sinks: DIR/out/<gateway>.jsonl by default, NATS JetStream with --sink
    /// nats://host:port (docs/PROTOCOL.md, docs/CENTRAL.md).
    #[cfg(feature = "central")]
    Collect {
        /// Address to listen on for gateways over WebSocket, e.g. 0.0.0.0:9443 (port 0:
        /// ephemeral; the bound address is written to DIR/collect.addr). Required unless
        /// --mqtt is given.
        #[arg(long, required_unless_present = "mqtt")]
        listen: Option<String>,
        /// Also receive the batches gateways publish to this MQTT broker
        /// (mqtt[s]://[user@]host[:port]; [upstream] url = "mqtts://…" on the gateways):
        /// QoS 1, persistent session, acknowledged once stored.
        #[arg(long, value_name = "URL")]
        mqtt: Option<String>,
        /// Topic filter to subscribe to, repeatable; a shared subscription splits the
        /// messages between the collectors of a group.
        #[arg(
            long = "topic",
            value_name = "FILTER",
            requires = "mqtt",
            default_value = "$share/edgeferry-collect/edgeferry/+/batches"
        )]
        topics: Vec<String>,
        /// MQTT client id of the persistent session, unique per collector and the same
        /// across its restarts (default: made up once, kept in DIR/mqtt-client-id).
        #[arg(long, requires = "mqtt")]
        mqtt_client_id: Option<String>,
        /// CA (PEM) for the broker's certificate (default: the system's roots).
        #[arg(long, requires = "mqtt")]
        mqtt_ca: Option<PathBuf>,
        /// Client certificate (PEM) for brokers that require one.
        #[arg(long, requires_all = ["mqtt", "mqtt_key"])]
        mqtt_cert: Option<PathBuf>,
        /// Private key (PEM) of --mqtt-cert.
        #[arg(long, requires = "mqtt_cert")]
        mqtt_key: Option<PathBuf>,
        /// File with the password of the URL's user name.
        #[arg(long, requires = "mqtt")]
        mqtt_password_file: Option<PathBuf>,
        /// Most MQTT messages received and not yet acknowledged (being stored).
        #[arg(long, default_value_t = 256, requires = "mqtt")]
        mqtt_max_in_flight: usize,
        /// Directory for collect.addr and metrics.addr, and for out/*.jsonl and the dedup
        /// marks when no --sink is given.
        #[arg(long)]
        data_dir: PathBuf,
        /// Where batches are made durable, repeatable (each batch is acknowledged once every
        /// sink has it): jsonl:DIR, or
        /// nats://[user:pass@]host:port[,host:port…][?stream=EDGEFERRY&replicas=1&max_age=7d&max_bytes=10GiB].
        /// Default: jsonl:<data-dir>.
        #[arg(long = "sink", value_name = "URL")]
        sinks: Vec<edgeferry::collect::SinkSpec>,
        /// Accepted bearer tokens, one per line; without it every client is accepted.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Server certificate chain (PEM); enables TLS.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// Server private key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// CA (PEM) for client certificates; enables mutual TLS.
        #[arg(long, requires = "tls_cert")]
        client_ca: Option<PathBuf>,
        /// Most concurrent gateway sessions (past the upgrade and its token check); further
        /// gateways are refused with HTTP 503 and retry.
        #[arg(long, default_value_t = 1024)]
        max_connections: usize,
        /// Most connections not yet authenticated (TLS handshake, WebSocket upgrade); at the
        /// limit the oldest is closed for the newcomer.
        #[arg(long, default_value_t = 128)]
        max_pending: usize,
        /// Most unauthenticated connections from one IP address.
        #[arg(long, default_value_t = 16)]
        max_pending_per_address: usize,
        /// Most bytes of batches being stored at once (their JSON lines), all connections
        /// together, e.g. 256MiB; at the limit connections wait before reading their next
        /// batch (counted in edgeferry_collect_buffer_full_total).
        #[arg(long, default_value = "256MiB")]
        max_buffered: bytesize::ByteSize,
        /// Serve Prometheus /metrics and /healthz here (e.g. 127.0.0.1:9871).
        #[arg(long)]
        metrics_listen: Option<String>,
        /// Largest frame body accepted, bytes.
        #[arg(long, hide = true, default_value_t = edgeferry::protocol::DEFAULT_MAX_FRAME)]
        max_frame: u32,
        /// Heartbeat interval (whole seconds).
        #[arg(long, hide = true, default_value = "15s", value_parser = humantime::parse_duration)]
        heartbeat: std::time::Duration,
        /// Time a client may take for each of TLS handshake, WebSocket upgrade and Hello;
        /// one that stalls is closed (counted in edgeferry_collect_handshake_timeouts_total).
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        handshake_timeout: std::time::Duration,
    },
    /// Load what the collectors put into NATS JetStream into PostgreSQL: a durable pull
    /// consumer, one transaction per fetch, acknowledged after the commit; aggregates
    /// upserted by window keeping the highest version (docs/CENTRAL.md). Several may run.
    #[cfg(feature = "central")]
    Load {
        /// The stream, as the collectors' --sink: nats://host:port[,host:port…][?stream=NAME].
        #[arg(long, value_name = "URL")]
        from: edgeferry::collect::nats::NatsSpec,
        /// The database: postgres://user[:password]@host[:port]/database. The schema is
        /// created or upgraded at start (table edgeferry_schema holds its version).
        #[arg(long, value_name = "URL")]
        to: String,
        /// Durable consumer name; loaders sharing it share the work.
        #[arg(long, default_value = "edgeferry-loader")]
        consumer: String,
        /// Most stream messages (gateway batches) per transaction.
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..))]
        batch: u16,
        /// Serve Prometheus /metrics and /healthz here (e.g. 127.0.0.1:9872).
        #[arg(long)]
        metrics_listen: Option<String>,
        /// How long a message handed to a loader that died waits before another gets it.
        #[arg(long, hide = true, default_value = "30s", value_parser = humantime::parse_duration)]
        ack_wait: std::time::Duration,
    },
    /// Check or salvage the data directory offline (journal, outbox, checkpoint, epoch).
    Store {
        #[command(subcommand)]
        action: StoreAction,
    },
    /// Run the whole product on this machine for a while: an embedded MQTT broker, simulated
    /// sensors, edgeferry and the reference collector (with an upstream outage midway), then
    /// check that every published reading arrived. Exit code 0 on MATCH, 2 otherwise.
    #[cfg(all(feature = "central", feature = "embedded-broker"))]
    Demo {
        /// How long the sensors publish, e.g. 60s, 5m.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// Keep the data (journal, outbox, collector output, config, log) in DIR, which must be
        /// empty or not exist; otherwise a temporary directory is used and removed.
        #[arg(long, value_name = "DIR")]
        keep: Option<PathBuf>,
    },
    /// Print the journal's contents (offline; for checks and tests), one JSON object per line.
    DumpJournal {
        /// Configuration file (its gateway.data_dir is read).
        #[arg(short, long, default_value = "/etc/edgeferry/config.toml")]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum StoreAction {
    /// Check every part of the store without changing anything; exit code 0 intact, 3 damage
    /// found, 2 the check itself failed. Works while the daemon runs (results may be stale).
    Verify {
        /// Configuration file (its gateway.data_dir is read).
        #[arg(short, long, default_value = "/etc/edgeferry/config.toml")]
        config: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Salvage a damaged store with the daemon stopped: keep every valid record, move damaged
    /// bytes and files into <data_dir>/quarantine/<UTC date-time>/ (nothing is deleted).
    Repair {
        /// Configuration file (its gateway.data_dir and store.segment_size are read).
        #[arg(short, long, default_value = "/etc/edgeferry/config.toml")]
        config: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    edgeferry::tls::install_default_provider();
    let with_config = |path: &std::path::Path, f: &dyn Fn(edgeferry::Config) -> Exit| {
        match cli::load_config(path) {
            Ok(cfg) => f(cfg),
            Err(e) => e,
        }
    };
    let exit = match cli.command {
        Command::CheckConfig { config } => cli::check_config(&config),
        Command::Run { config } => with_config(&config, &|c| cli::run_daemon(c, &config)),
        Command::Status { config, json } => with_config(&config, &|c| cli::status(&c, json)),
        Command::Tail { config, series } => {
            with_config(&config, &|c| cli::tail(&c, series.as_deref()))
        }
        #[cfg(feature = "central")]
        Command::Collect {
            listen,
            mqtt,
            topics,
            mqtt_client_id,
            mqtt_ca,
            mqtt_cert,
            mqtt_key,
            mqtt_password_file,
            mqtt_max_in_flight,
            data_dir,
            sinks,
            token_file,
            tls_cert,
            tls_key,
            client_ca,
            max_connections,
            max_pending,
            max_pending_per_address,
            max_buffered,
            metrics_listen,
            max_frame,
            heartbeat,
            handshake_timeout,
        } => {
            let mut cfg = edgeferry::collect::CollectConfig::new("", data_dir);
            cfg.listen = listen;
            cfg.mqtt = mqtt.map(|url| {
                let mut m = edgeferry::collect::MqttSourceConfig::new(url, topics);
                m.client_id = mqtt_client_id;
                m.ca_file = mqtt_ca;
                m.cert_file = mqtt_cert;
                m.key_file = mqtt_key;
                m.password_file = mqtt_password_file;
                m.max_in_flight = mqtt_max_in_flight;
                m
            });
            cfg.sinks = sinks;
            cfg.token_file = token_file;
            cfg.tls_cert = tls_cert;
            cfg.tls_key = tls_key;
            cfg.client_ca = client_ca;
            cfg.max_connections = max_connections;
            cfg.max_pending = max_pending;
            cfg.max_pending_per_address = max_pending_per_address;
            cfg.max_buffered = max_buffered.as_u64();
            cfg.metrics_listen = metrics_listen;
            cfg.max_frame = max_frame;
            cfg.heartbeat = heartbeat;
            cfg.handshake_timeout = handshake_timeout;
            cli::run_collect(cfg)
        }
        #[cfg(feature = "central")]
        Command::Load {
            from,
            to,
            consumer,
            batch,
            metrics_listen,
            ack_wait,
        } => {
            let mut cfg = edgeferry::collect::load::LoadConfig::new(from, to);
            cfg.consumer = consumer;
            cfg.batch = usize::from(batch);
            cfg.ack_wait = ack_wait;
            cfg.metrics_listen = metrics_listen;
            cli::run_load(cfg)
        }
        Command::Store { action } => {
            let (config, json, tool) = match action {
                StoreAction::Verify { config, json } => (config, json, cli::StoreTool::Verify),
                StoreAction::Repair { config, json } => (config, json, cli::StoreTool::Repair),
            };
            with_config(&config, &|c| cli::store(&c, tool, json))
        }
        #[cfg(all(feature = "central", feature = "embedded-broker"))]
        Command::Demo { duration, keep } => {
            cli::demo(edgeferry::demo::DemoOptions { duration, keep })
        }
        Command::DumpJournal { config } => with_config(&config, &|c| cli::dump_journal(&c)),
    };
    ExitCode::from(exit.code())
}

/// glibc keeps up to 8 malloc arenas per core and hands them to whichever thread allocates;
/// tokio moves work between worker and blocking threads, so freed memory piles up in many
/// arenas. Measured (`cargo bench --bench ingest`, 10,000 series at 10,000 readings/s): peak
/// RSS 35–73 MiB over five runs with the default, 37.1 and 37.6 MiB with two arenas, at the
/// same throughput. An explicit `MALLOC_ARENA_MAX` in the environment wins. (musl, the ARM
/// release target, has no arenas; this is compiled for glibc only.)
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; it is called first thing in
        // main, before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}
