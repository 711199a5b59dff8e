//! The CA's own material on disk: a self-signed root created on first start and reused
//! afterwards, or a plugged-in intermediate (Istio's `cacerts` layout).
//!
//! Self-signed layout under `<state-dir>/ca/`: `ca-key.pem` (0600), `ca-cert.pem`.
//! Plugged-in layout: `ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ca_core::CertificateAuthority;
use ca_core::keys::KeyAlgorithm;
use rcgen::KeyPair;
use time::OffsetDateTime;

use crate::fsutil;

/// Where the CA's certificate and key come from.
#[derive(Clone, Debug)]
pub enum CaSource {
    /// A self-signed root kept in the state directory.
    SelfSigned {
        /// Key algorithm for a new root.
        key: KeyAlgorithm,
        /// Lifetime of a new root.
        lifetime: Duration,
    },
    /// An intermediate provided by the operator.
    Plugged(PathBuf),
    /// A self-signed root kept in the Kubernetes Secret `istio-ca-secret` (type
    /// `istio.io/ca-root`) of `namespace`, shared by every replica.
    KubernetesSecret {
        /// The CA's own namespace.
        namespace: String,
        /// Key algorithm for a new root.
        key: KeyAlgorithm,
        /// Lifetime of a new root.
        lifetime: Duration,
    },
}

/// Why the CA material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file could not be read or written.
    #[error("{path}: {err}")]
    Io {
        /// Which file.
        path: String,
        /// What went wrong.
        err: std::io::Error,
    },
    /// Content is not what it should be.
    #[error("{0}")]
    Invalid(String),
}

fn read(path: &Path) -> Result<String, StateError> {
    std::fs::read_to_string(path).map_err(|err| StateError::Io {
        path: path.display().to_string(),
        err,
    })
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StateError> {
    fsutil::write_atomic(path, bytes, mode).map_err(|err| StateError::Io {
        path: path.display().to_string(),
        err,
    })
}

fn load_key(path: &Path) -> Result<KeyPair, StateError> {
    ca_core::keys::key_pair_from_pem(&read(path)?).map_err(|e| {
        StateError::Invalid(format!("{}: not a usable private key: {e}", path.display()))
    })
}

fn load_certs(path: &Path) -> Result<Vec<Vec<u8>>, StateError> {
    let certs = ca_core::pem::parse_certificates(read(path)?.as_bytes())
        .map_err(|e| StateError::Invalid(format!("{}: {e}", path.display())))?;
    Ok(certs.into_iter().map(|c| c.as_ref().to_vec()).collect())
}

/// A fresh self-signed root and the PEM of its key (to be persisted by the caller).
fn new_root(
    key: KeyAlgorithm,
    trust_domain: &str,
    lifetime: Duration,
) -> Result<(CertificateAuthority, String), StateError> {
    let key_pair = key
        .generate()
        .map_err(|e| StateError::Invalid(format!("key generation: {e}")))?;
    let key_pem = key_pair.serialize_pem();
    let ca = CertificateAuthority::new_self_signed_root(
        key_pair,
        trust_domain,
        OffsetDateTime::now_utc(),
        lifetime,
    )
    .map_err(|e| StateError::Invalid(e.to_string()))?;
    Ok((ca, key_pem))
}

/// Loads the CA, creating a self-signed root on first start.
pub fn load_or_create(
    state_dir: &Path,
    trust_domain: &str,
    source: &CaSource,
) -> Result<CertificateAuthority, StateError> {
    match source {
        CaSource::Plugged(dir) => load_plugged(dir),
        CaSource::KubernetesSecret { .. } => Err(StateError::Invalid(
            "the root lives in a Kubernetes Secret: use load_or_create_in_cluster".into(),
        )),
        CaSource::SelfSigned { key, lifetime } => {
            let dir = state_dir.join("ca");
            fsutil::create_private_dir(&dir).map_err(|err| StateError::Io {
                path: dir.display().to_string(),
                err,
            })?;
            let key_path = dir.join("ca-key.pem");
            let cert_path = dir.join("ca-cert.pem");
            match (key_path.exists(), cert_path.exists()) {
                (true, true) => {
                    let key = load_key(&key_path)?;
                    let cert = load_certs(&cert_path)?.remove(0);
                    let ca =
                        CertificateAuthority::from_parts(cert.clone(), key, vec![], vec![cert])
                            .map_err(|e| StateError::Invalid(format!("{}: {e}", dir.display())))?;
                    tracing::info!(serial = %ca.facts().serial, not_after = %ca.facts().not_after, "loaded self-signed root");
                    Ok(ca)
                }
                (false, false) => {
                    let (ca, key_pem) = new_root(*key, trust_domain, *lifetime)?;
                    // Key first: a crash in between leaves a key without a certificate,
                    // which the next start refuses loudly rather than minting a second root.
                    write(&key_path, key_pem.as_bytes(), 0o600)?;
                    write(&cert_path, ca.roots_pem().as_bytes(), 0o644)?;
                    tracing::info!(serial = %ca.facts().serial, not_after = %ca.facts().not_after, "created self-signed root");
                    Ok(ca)
                }
                (true, false) => Err(StateError::Invalid(format!(
                    "{} exists but {} does not: refusing to create a new root over an existing key; restore the certificate or move the key away",
                    key_path.display(),
                    cert_path.display()
                ))),
                (false, true) => Err(StateError::Invalid(format!(
                    "{} exists but its key {} does not",
                    cert_path.display(),
                    key_path.display()
                ))),
            }
        }
    }
}

fn load_plugged(dir: &Path) -> Result<CertificateAuthority, StateError> {
    let cert = load_certs(&dir.join("ca-cert.pem"))?.remove(0);
    let key = load_key(&dir.join("ca-key.pem"))?;
    let roots = load_certs(&dir.join("root-cert.pem"))?;
    let mut chain = load_certs(&dir.join("cert-chain.pem"))?;
    // Istio's cert-chain.pem usually starts with ca-cert.pem itself.
    if chain.first() == Some(&cert) {
        chain.remove(0);
    }
    let cert_is_root = roots.contains(&cert);
    if !cert_is_root && chain.last().is_none_or(|last| !roots.contains(last)) {
        chain.push(roots[0].clone());
    }
    if cert_is_root {
        chain.clear();
    }
    let ca = CertificateAuthority::from_parts(cert, key, chain, roots)
        .map_err(|e| StateError::Invalid(format!("{}: {e}", dir.display())))?;
    tracing::info!(dir = %dir.display(), serial = %ca.facts().serial, not_after = %ca.facts().not_after, "loaded plugged-in CA");
    Ok(ca)
}

/// What Citadel wrote after the leaf in an `istio.<sa>` Secret's `cert-chain.pem`:
/// nothing under a self-signed root; under a plugged-in CA, the certificates of the
/// operator's `cert-chain.pem`, as listed there.
pub fn citadel_chain_pem(source: &CaSource) -> Result<String, StateError> {
    match source {
        CaSource::Plugged(dir) => Ok(load_certs(&dir.join("cert-chain.pem"))?
            .iter()
            .map(|c| ca_core::pem::certificate(c))
            .collect()),
        CaSource::SelfSigned { .. } | CaSource::KubernetesSecret { .. } => Ok(String::new()),
    }
}

/// Name of the Secret holding the self-signed root (docs/COMPATIBILITY.md, "Kubernetes objects").
pub const ROOT_SECRET: &str = "istio-ca-secret";

fn root_from_secret(
    secret: &k8s_openapi::api::core::v1::Secret,
) -> Result<CertificateAuthority, StateError> {
    let data = secret
        .data
        .as_ref()
        .ok_or_else(|| StateError::Invalid(format!("Secret {ROOT_SECRET} has no data")))?;
    let field = |k: &str| {
        data.get(k)
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .ok_or_else(|| StateError::Invalid(format!("Secret {ROOT_SECRET} has no {k}")))
    };
    let cert = ca_core::pem::parse_certificates(field("ca-cert.pem")?.as_bytes())
        .map_err(|e| StateError::Invalid(format!("Secret {ROOT_SECRET} ca-cert.pem: {e}")))?
        .remove(0)
        .as_ref()
        .to_vec();
    let key = ca_core::keys::key_pair_from_pem(&field("ca-key.pem")?)
        .map_err(|e| StateError::Invalid(format!("Secret {ROOT_SECRET} ca-key.pem: {e}")))?;
    CertificateAuthority::from_parts(cert.clone(), key, vec![], vec![cert])
        .map_err(|e| StateError::Invalid(format!("Secret {ROOT_SECRET}: {e}")))
}

/// Loads the self-signed root from Secret `istio-ca-secret` in `namespace`, creating it
/// on first start. Safe when several replicas start at once: each creates only if
/// absent, and a replica that loses the race (409) reads back the winner's root.
pub async fn load_or_create_in_cluster(
    client: kube::Client,
    namespace: &str,
    trust_domain: &str,
    key: KeyAlgorithm,
    lifetime: Duration,
) -> Result<CertificateAuthority, StateError> {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Api, ObjectMeta, PostParams};
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let io = |what: &str, e: kube::Error| {
        StateError::Invalid(format!("{what} Secret {namespace}/{ROOT_SECRET}: {e}"))
    };
    if let Some(existing) = api
        .get_opt(ROOT_SECRET)
        .await
        .map_err(|e| io("reading", e))?
    {
        let ca = root_from_secret(&existing)?;
        tracing::info!(serial = %ca.facts().serial, not_after = %ca.facts().not_after, "loaded the root from Secret {namespace}/{ROOT_SECRET}");
        return Ok(ca);
    }
    let (ca, key_pem) = new_root(key, trust_domain, lifetime)?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(ROOT_SECRET.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        type_: Some("istio.io/ca-root".into()),
        data: Some(
            [
                (
                    "ca-cert.pem".to_string(),
                    ByteString(ca.roots_pem().as_bytes().to_vec()),
                ),
                ("ca-key.pem".to_string(), ByteString(key_pem.into_bytes())),
            ]
            .into(),
        ),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(serial = %ca.facts().serial, not_after = %ca.facts().not_after, "created the root in Secret {namespace}/{ROOT_SECRET}");
            Ok(ca)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            // Another replica created it first: use theirs, drop ours.
            let winner = api
                .get(ROOT_SECRET)
                .await
                .map_err(|e| io("reading back", e))?;
            let ca = root_from_secret(&winner)?;
            tracing::info!(serial = %ca.facts().serial, "another replica created the root first; using it");
            Ok(ca)
        }
        Err(e) => Err(io("creating", e)),
    }
}
