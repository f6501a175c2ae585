//! Why ingest stops.

use super::decode::TemplateError;
use crate::store::StoreError;

/// Why ingest could not run.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// `[mqtt] url` is not usable.
    #[error("mqtt.url {url:?}: {reason}")]
    Url {
        /// `[mqtt] url` as configured.
        url: String,
        /// What is wrong with it: unparsable, a scheme other than `mqtt`/`mqtts`, or no host.
        reason: String,
    },
    /// A template did not parse (validated earlier; kept for completeness).
    #[error("mqtt.subscribe template: {0}")]
    Template(#[from] TemplateError),
    /// TLS files could not be loaded.
    #[error("mqtt TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The password file could not be read.
    #[error("mqtt.password_file {path}: {source}")]
    Password {
        /// `[mqtt] password_file` as configured, so the operator knows which file to fix.
        path: String,
        /// The operating system's reason it could not be read (not found, permission denied, ...).
        source: std::io::Error,
    },
    /// The journal failed: nothing more can be made durable, so ingest stops (and with it
    /// the acknowledgements), leaving everything unacknowledged with the broker.
    #[error("journal: {0}")]
    Journal(#[from] StoreError),
}
