//! Ways for the agent to prove its identity to the CA, behind one trait: the current
//! certificate in `--certs-dir`, the admin-exported bootstrap bundle, and a GCE
//! identity token (`crate::gce`).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use ca_core::SpiffeId;
use time::OffsetDateTime;

/// How a credential is presented to the CA.
#[derive(Clone)]
pub enum Proof {
    /// Mutual TLS with this certificate chain and key (PEM).
    ClientCert {
        /// Leaf first.
        chain_pem: String,
        /// PKCS#8 PEM. Never logged.
        key_pem: String,
    },
    /// `authorization: Bearer` with this token (a GCE identity token). Never logged.
    Bearer {
        /// The token.
        token: String,
    },
}

impl std::fmt::Debug for Proof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Proof::ClientCert { .. } => f.write_str("ClientCert(...)"),
            Proof::Bearer { .. } => f.write_str("Bearer(...)"),
        }
    }
}

/// A credential ready to be used.
#[derive(Clone, Debug)]
pub struct Credential {
    /// Which source it came from (`current`, `bootstrap`).
    pub source: &'static str,
    /// How to present it.
    pub proof: Proof,
    /// The identity it proves, when known before asking (a token proves an instance;
    /// the CA maps it to an identity).
    pub identity: Option<SpiffeId>,
    /// Serial of the certificate, for messages.
    pub serial: String,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// When it stops being usable.
    pub not_after: OffsetDateTime,
    /// The trust bundle that came with it (PEM roots).
    pub roots_pem: String,
}

impl Credential {
    /// The identity for messages.
    pub fn who(&self) -> String {
        self.identity
            .as_ref()
            .map(|i| i.to_string())
            .unwrap_or_else(|| "this instance".into())
    }

    /// Whether it is still within its validity at `now`.
    pub fn is_valid_at(&self, now: OffsetDateTime) -> bool {
        self.not_after > now
    }
}

/// What a source found.
#[derive(Debug)]
pub enum Found {
    /// A credential (possibly expired: the caller decides).
    Credential(Box<Credential>),
    /// Nothing there.
    Absent,
    /// Something there, but unusable (why).
    Unusable(String),
    /// Could not be obtained right now (e.g. the metadata server did not answer).
    Unavailable(String),
}

/// A place credentials come from.
pub trait CredentialSource: Send + Sync {
    /// Name used in logs and status.
    fn name(&self) -> &'static str;
    /// Looks for a credential.
    fn load<'a>(&'a self) -> Pin<Box<dyn Future<Output = Found> + Send + 'a>>;
}

/// A directory in the `/etc/certs` layout: `key.pem`, `cert-chain.pem`, `root-cert.pem`.
/// Both the rotating certificates and the bootstrap bundle use it.
pub struct CertDir {
    name: &'static str,
    dir: PathBuf,
}

impl CertDir {
    /// A source named `name` reading `dir`.
    pub fn new(name: &'static str, dir: &Path) -> Self {
        CertDir {
            name,
            dir: dir.to_owned(),
        }
    }

    /// Reads the directory synchronously.
    pub fn read(&self) -> Found {
        read_dir(self.name, &self.dir)
    }
}

/// Reads a certificate directory into a credential.
pub fn read_dir(name: &'static str, dir: &Path) -> Found {
    let key_path = dir.join("key.pem");
    let chain_path = dir.join("cert-chain.pem");
    if !key_path.exists() && !chain_path.exists() {
        return Found::Absent;
    }
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    let loaded = (|| -> Result<Credential, String> {
        let key_pem = read(&key_path)?;
        let chain_pem = read(&chain_path)?;
        let roots_pem = read(&dir.join("root-cert.pem"))?;
        let chain = ca_core::pem::parse_certificates(chain_pem.as_bytes())
            .map_err(|e| format!("{}: {e}", chain_path.display()))?;
        let facts = ca_core::x509::inspect(&chain[0])
            .map_err(|e| format!("{}: {e}", chain_path.display()))?;
        let identity = facts.spiffe_id().ok_or_else(|| {
            format!(
                "{}: the certificate has no single SPIFFE URI SAN",
                chain_path.display()
            )
        })?;
        let key = ca_core::keys::key_pair_from_pem(&key_pem)
            .map_err(|e| format!("{}: {e}", key_path.display()))?;
        if rcgen::PublicKeyData::subject_public_key_info(&key) != facts.spki_der {
            return Err(format!(
                "{} does not match the certificate in {}",
                key_path.display(),
                chain_path.display()
            ));
        }
        Ok(Credential {
            source: name,
            proof: Proof::ClientCert { chain_pem, key_pem },
            identity: Some(identity),
            serial: facts.serial,
            not_before: facts.not_before,
            not_after: facts.not_after,
            roots_pem,
        })
    })();
    match loaded {
        Ok(c) => Found::Credential(Box::new(c)),
        Err(e) => Found::Unusable(e),
    }
}

impl CredentialSource for CertDir {
    fn name(&self) -> &'static str {
        self.name
    }

    fn load<'a>(&'a self) -> Pin<Box<dyn Future<Output = Found> + Send + 'a>> {
        Box::pin(async move { self.read() })
    }
}
