//! The admin endpoint: Prometheus metrics, JSON status, health and readiness.

use serde::{Deserialize, Serialize};

/// `[admin]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin HTTP endpoint. Loopback by default: it is unauthenticated.
    #[serde(default = "default_listen")]
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:9870".to_string()
}
