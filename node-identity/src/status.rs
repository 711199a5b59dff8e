//! The agent's small status file, and `node-identity status`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// What the running agent last knew; read by `node-identity status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    /// SPIFFE ID of the published certificate.
    pub identity: Option<String>,
    /// Its serial.
    pub serial: Option<String>,
    /// Its expiry.
    pub not_after: Option<String>,
    /// When the agent plans to renew.
    pub next_renewal: Option<String>,
    /// Which credential the last successful renewal used.
    pub last_credential: Option<String>,
    /// When the last renewal succeeded.
    pub last_success: Option<String>,
    /// The last failure, if the last attempt failed.
    pub last_error: Option<String>,
    /// When it failed.
    pub last_error_at: Option<String>,
}

/// RFC 3339 for status output.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

impl Status {
    /// Reads the status file (missing or unreadable: empty status).
    pub fn load(path: &Path) -> Status {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Writes it atomically; a failure is logged, never fatal (the certificates matter,
    /// the status file does not).
    pub fn save(&self, path: &Path) {
        let result = (|| -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = path.with_extension("json.tmp");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644)
                .open(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, "could not write the status file");
        }
    }
}
