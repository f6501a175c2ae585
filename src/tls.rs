//! rustls client configurations, always built on the `ring` provider.
//!
//! `ring` is chosen explicitly (not aws-lc-rs) because it cross-compiles cleanly to
//! `armv7-unknown-linux-musleabihf` without cmake or a C toolchain for the target.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a TLS configuration could not be built; always names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("cannot read {what} from {path}: {reason}")]
    Pem {
        /// What the file was supposed to contain.
        what: &'static str,
        /// The PEM file as configured (a CA, certificate or key file setting), so the operator
        /// knows which one to fix.
        path: PathBuf,
        /// The reader's complaint: an I/O error (missing file, permission denied) or malformed PEM.
        reason: String,
    },
    /// The file parsed but held nothing usable.
    #[error("{path} contains no {what}")]
    Empty {
        /// What the file should have held (`certificates`).
        what: &'static str,
        /// The PEM file as configured; it parsed but had no block of that kind.
        path: PathBuf,
    },
    /// rustls refused the combination.
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Installs `ring` as the process-wide default provider. Called once from `main`;
/// tokio-tungstenite's rustls features pick no provider and would panic otherwise.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Pem {
            what: "certificates",
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what: "certificates",
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Reads the first private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        what: "a private key",
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// A client configuration trusting `ca_file` (or the system roots) and presenting
/// `cert_file`/`key_file` when both are given.
pub fn client_config(
    ca_file: Option<&Path>,
    cert_file: Option<&Path>,
    key_file: Option<&Path>,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(ca) => {
            for c in load_certs(ca)? {
                roots.add(c)?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!("while loading system CA certificates: {e}");
            }
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                tracing::warn!(
                    "no system CA certificates found; set a ca_file to verify the server"
                );
            }
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    Ok(match (cert_file, key_file) {
        (Some(c), Some(k)) => builder.with_client_auth_cert(load_certs(c)?, load_key(k)?)?,
        _ => builder.with_no_client_auth(),
    })
}
