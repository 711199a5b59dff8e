//! The signing authority: a CA certificate, its key behind [`CaSigner`], the chain above
//! it and the trust bundle; issuance in three steps (template, sign, re-check).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SigningKey,
};
use ring::rand::{SecureRandom, SystemRandom};
use time::OffsetDateTime;

use crate::csr::{self, KeyKind};
use crate::dns::DnsName;
use crate::error::IssueError;
use crate::keys::PublicKey;
use crate::leaf::LeafProfile;
use crate::policy::{IssuancePolicy, Validity};
use crate::spiffe::SpiffeId;
use crate::x509::{self, CertFacts};

/// A key that signs certificates for the CA. A file-backed `rcgen::KeyPair` is one; a
/// Kubernetes-secret or KMS/HSM key can implement [`rcgen::SigningKey`] and plug in
/// without touching issuance.
pub trait CaSigner: SigningKey + Send + Sync {}
impl<T: SigningKey + Send + Sync> CaSigner for T {}

/// Shared handle on the CA key, so an `rcgen::Issuer` can own it.
#[derive(Clone)]
pub struct SignerHandle(Arc<dyn CaSigner>);

impl PublicKeyData for SignerHandle {
    fn der_bytes(&self) -> &[u8] {
        self.0.der_bytes()
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.0.algorithm()
    }
}

impl SigningKey for SignerHandle {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.0.sign(msg)
    }
}

impl fmt::Debug for SignerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SignerHandle(...)")
    }
}

/// A certificate the CA signed, with what the audit record needs.
#[derive(Clone, Debug)]
pub struct IssuedCertificate {
    /// DER of the leaf.
    pub der: Vec<u8>,
    /// Facts read back from the signed leaf.
    pub facts: CertFacts,
    /// SHA-256 of the leaf's `SubjectPublicKeyInfo`, hex.
    pub spki_sha256: String,
    /// SHA-256 of the leaf DER, hex.
    pub cert_sha256: String,
}

impl IssuedCertificate {
    /// PEM of the leaf.
    pub fn pem(&self) -> String {
        crate::pem::certificate(&self.der)
    }
}

/// Why CA material could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    /// The CA certificate does not parse or is not a CA.
    #[error("CA certificate: {0}")]
    Certificate(String),
    /// The key does not belong to the CA certificate.
    #[error("the CA key does not match the public key of the CA certificate")]
    KeyMismatch,
    /// rcgen refused to build the certificate.
    #[error("could not build certificate: {0}")]
    Build(#[from] rcgen::Error),
}

/// The CA: its certificate, key, chain above it and trust bundle.
pub struct CertificateAuthority {
    issuer: Issuer<'static, SignerHandle>,
    cert_der: Vec<u8>,
    facts: CertFacts,
    /// CA certificates above `cert_der`, root last; empty when `cert_der` is a root.
    chain_above: Vec<Vec<u8>>,
    /// Trusted roots (a list from the start, so rotation can add one).
    roots: Vec<Vec<u8>>,
    /// PEM forms, encoded once: every answer carries them.
    chain_pem: Vec<String>,
    roots_pem: String,
    /// What every SPIFFE leaf of this CA shares (see [`crate::leaf`]).
    leaf: LeafProfile,
    rng: SystemRandom,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("serial", &self.facts.serial)
            .field("not_after", &self.facts.not_after)
            .field("chain_above", &self.chain_above.len())
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

/// A fresh serial: 16 bytes, positive and of fixed length, so its DER INTEGER needs no
/// leading zero. The first 8 bytes are a clock (nanoseconds since the Unix epoch, kept
/// strictly increasing within the process, with bit 62 set), the last 8 are random
/// (64 bits from the system CSPRNG, what the CA/Browser Forum asks of public CAs;
/// fetched a few kilobytes at a time, see [`SerialEntropy`]).
///
/// Serials are the keys of the audit store's serial index. Random keys land all over
/// that B-tree, so every record rewrites some old leaf node, and the cost grows with
/// the store; time-ordered keys append at its right edge, and the clock lets the store
/// index a whole group commit under one key (see `ca-audit-bench` in
/// docs/BENCHMARKS.md).
pub fn fresh_serial(rng: &SystemRandom) -> Result<[u8; 16], IssueError> {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        & CLOCK_BITS;
    let next = |last: u64| now.max(last + 1) & CLOCK_BITS;
    let previous = LAST
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
            Some(next(last))
        })
        .unwrap_or_else(|last| last);
    let clock = next(previous);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&(clock | 1 << 62).to_be_bytes());
    SERIAL_ENTROPY
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take(rng, &mut bytes[8..])?;
    Ok(bytes)
}

/// System CSPRNG output for serials, fetched 4 KiB (512 serials) per system call
/// rather than one call per certificate. A serial's randomness is public once the
/// certificate is issued; what matters is that nobody can predict it beforehand, and
/// bytes held here are as unpredictable as bytes fetched later. Each byte is handed
/// out once and zeroed.
struct SerialEntropy {
    bytes: [u8; 4096],
    used: usize,
}

static SERIAL_ENTROPY: std::sync::Mutex<SerialEntropy> = std::sync::Mutex::new(SerialEntropy {
    bytes: [0; 4096],
    used: 4096,
});

impl SerialEntropy {
    fn take(&mut self, rng: &SystemRandom, out: &mut [u8]) -> Result<(), IssueError> {
        if self.used + out.len() > self.bytes.len() {
            rng.fill(&mut self.bytes)
                .map_err(|_| IssueError::Internal("random number generator failed".into()))?;
            self.used = 0;
        }
        let taken = &mut self.bytes[self.used..self.used + out.len()];
        out.copy_from_slice(taken);
        taken.fill(0);
        self.used += out.len();
        Ok(())
    }
}

const CLOCK_BITS: u64 = (1 << 62) - 1;

/// The issuance clock (nanoseconds since the Unix epoch) of a serial in the hex form
/// of [`CertFacts::serial`](crate::x509::CertFacts), if it has the shape of one made
/// by [`fresh_serial`]. Serials from before the clock existed have the same shape
/// with a random clock, so a caller must treat the answer as a hint.
pub fn serial_clock_nanos(serial_hex: &str) -> Option<u64> {
    if serial_hex.len() != 32 {
        return None;
    }
    let clock = u64::from_str_radix(serial_hex.get(..16)?, 16).ok()?;
    (clock >> 62 == 1).then_some(clock & CLOCK_BITS)
}

impl CertificateAuthority {
    /// Creates a self-signed root for `trust_domain`, valid for `lifetime` from `now`.
    /// Returns the authority; its certificate is [`CertificateAuthority::cert_der`].
    pub fn new_self_signed_root(
        key: impl CaSigner + 'static,
        trust_domain: &str,
        now: OffsetDateTime,
        lifetime: Duration,
    ) -> Result<Self, AuthorityError> {
        let rng = SystemRandom::new();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(
            DnType::CommonName,
            format!("{trust_domain} workload root CA"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - crate::policy::BACKDATE;
        params.not_after = now + lifetime;
        params.serial_number = Some(SerialNumber::from_slice(
            &fresh_serial(&rng).map_err(|e| AuthorityError::Certificate(e.to_string()))?,
        ));
        let cert = params.self_signed(&key)?;
        let der = cert.der().to_vec();
        Self::from_parts(der.clone(), key, Vec::new(), vec![der])
    }

    /// Assembles an authority from an existing CA certificate and its key.
    /// `chain_above` holds the CA certificates above it (root last; empty for a root),
    /// `roots` the trust bundle.
    pub fn from_parts(
        cert_der: Vec<u8>,
        key: impl CaSigner + 'static,
        chain_above: Vec<Vec<u8>>,
        roots: Vec<Vec<u8>>,
    ) -> Result<Self, AuthorityError> {
        let facts = x509::inspect(&cert_der).map_err(AuthorityError::Certificate)?;
        if !facts.is_ca {
            return Err(AuthorityError::Certificate(
                "the certificate is not a CA (basicConstraints cA is not true)".into(),
            ));
        }
        if facts.spki_der != key.subject_public_key_info() {
            return Err(AuthorityError::KeyMismatch);
        }
        if roots.is_empty() {
            return Err(AuthorityError::Certificate(
                "the trust bundle is empty".into(),
            ));
        }
        let handle = SignerHandle(Arc::new(key));
        let issuer = Issuer::from_ca_cert_der(&cert_der.as_slice().into(), handle.clone())?;
        let leaf = prototype_profile(&issuer, &handle, &facts)?;
        let chain_pem = std::iter::once(&cert_der)
            .chain(chain_above.iter())
            .map(|c| crate::pem::certificate(c))
            .collect();
        let roots_pem = roots.iter().map(|r| crate::pem::certificate(r)).collect();
        Ok(CertificateAuthority {
            issuer,
            cert_der,
            facts,
            chain_above,
            roots,
            chain_pem,
            roots_pem,
            leaf,
            rng: SystemRandom::new(),
        })
    }

    /// DER of the CA certificate that signs leaves.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// Facts about the CA certificate (expiry, serial).
    pub fn facts(&self) -> &CertFacts {
        &self.facts
    }

    /// The trust bundle (DER roots).
    pub fn roots(&self) -> &[Vec<u8>] {
        &self.roots
    }

    /// The CA chain a leaf should be followed by: the signing CA, then each CA above it,
    /// root last.
    pub fn ca_chain(&self) -> impl Iterator<Item = &[u8]> {
        std::iter::once(self.cert_der.as_slice()).chain(self.chain_above.iter().map(Vec::as_slice))
    }

    /// [`CertificateAuthority::ca_chain`] as PEM, one certificate per element.
    pub fn ca_chain_pem(&self) -> &[String] {
        &self.chain_pem
    }

    /// The trust bundle as one PEM text (what `root-cert.pem` holds).
    pub fn roots_pem(&self) -> &str {
        &self.roots_pem
    }

    /// The CA key.
    pub(crate) fn signer(&self) -> &SignerHandle {
        self.issuer.key()
    }

    /// Whether the signing CA is itself a (self-signed) root.
    pub fn signer_is_root(&self) -> bool {
        self.chain_above.is_empty()
    }

    /// Issues a SPIFFE leaf for `identity` from a CSR.
    ///
    /// The CSR contributes its public key only. `requested_ttl_secs <= 0` means the
    /// policy's default.
    pub fn issue_from_csr(
        &self,
        csr_bytes: &[u8],
        identity: &SpiffeId,
        requested_ttl_secs: i64,
        policy: &IssuancePolicy,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, IssueError> {
        let ttl = policy.granted_ttl(requested_ttl_secs)?;
        let verified = csr::verify(csr_bytes)?;
        self.issue_for_key(&verified.public_key, identity, ttl, now)
    }

    /// Issues a SPIFFE leaf for `identity` binding `public_key`, valid for `ttl`
    /// (clamped to the signer's lifetime).
    pub fn issue_for_key(
        &self,
        public_key: &PublicKey,
        identity: &SpiffeId,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, IssueError> {
        let validity = self.validity(ttl, now)?;
        let serial = fresh_serial(&self.rng)?;
        // A SpiffeId is ASCII by construction (every component is checked), as the
        // leaf's IA5String SAN requires.
        let spki = public_key.spki_der();
        // One digest of the key serves the leaf's key identifier and the audit record.
        let spki_digest = ring::digest::digest(&ring::digest::SHA256, &spki);
        let tbs = self.leaf.tbs(
            &serial,
            validity,
            &spki,
            spki_digest.as_ref(),
            public_key.kind,
            identity.as_str(),
        );
        let signature = self.issuer.key().sign(&tbs).map_err(internal)?;
        let der = self.leaf.certificate(&tbs, &signature);
        let facts = crate::reread::read(&der).map_err(IssueError::Internal)?;
        self.recheck_spiffe_leaf(&facts, identity, &spki, validity)?;
        Ok(issued(der, facts, spki_digest.as_ref()))
    }

    /// Issues a SPIFFE leaf for `identity` that also names `dns_names` (operator
    /// configuration only: Citadel's names for control-plane service accounts). The
    /// URI SAN comes first, then the DNS names in the order given. With no DNS names
    /// this is [`CertificateAuthority::issue_for_key`].
    pub fn issue_for_key_with_dns(
        &self,
        public_key: &PublicKey,
        identity: &SpiffeId,
        dns_names: &[DnsName],
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, IssueError> {
        if dns_names.is_empty() {
            return self.issue_for_key(public_key, identity, ttl, now);
        }
        let sans = std::iter::once(SanType::URI(
            identity.as_str().try_into().map_err(internal)?,
        ))
        .chain(dns_sans(dns_names)?)
        .collect();
        let expected = ExpectedSans {
            uri: Some(identity.as_str()),
            dns: dns_names,
            ips: &[],
        };
        self.issue_with_sans(public_key, sans, &expected, self.validity(ttl, now)?)
    }

    /// Issues a TLS server certificate naming `dns_names` and `ips` (no SPIFFE ID):
    /// the CA's own endpoint, and serving certificates the operator configured.
    pub fn issue_server_cert(
        &self,
        public_key: &PublicKey,
        dns_names: &[DnsName],
        ips: &[std::net::IpAddr],
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, IssueError> {
        if dns_names.is_empty() && ips.is_empty() {
            return Err(IssueError::Internal(
                "a server certificate needs at least one name".into(),
            ));
        }
        let sans = dns_sans(dns_names)?
            .into_iter()
            .chain(ips.iter().map(|ip| SanType::IpAddress(*ip)))
            .collect();
        let expected = ExpectedSans {
            uri: None,
            dns: dns_names,
            ips,
        };
        self.issue_with_sans(public_key, sans, &expected, self.validity(ttl, now)?)
    }

    /// Signs a leaf template with `sans` (rcgen) and re-checks it against `expected`.
    fn issue_with_sans(
        &self,
        public_key: &PublicKey,
        sans: Vec<SanType>,
        expected: &ExpectedSans<'_>,
        validity: Validity,
    ) -> Result<IssuedCertificate, IssueError> {
        let params = leaf_template(
            public_key.kind,
            sans,
            validity,
            SerialNumber::from_slice(&fresh_serial(&self.rng)?),
        );
        let issued = self.sign(&params, public_key)?;
        self.recheck_leaf(&issued.facts, expected, &public_key.spki_der(), validity)?;
        Ok(issued)
    }

    fn validity(&self, ttl: Duration, now: OffsetDateTime) -> Result<Validity, IssueError> {
        IssuancePolicy::validity(ttl, now, self.facts.not_before, self.facts.not_after)
    }

    /// Signs a template with rcgen (certificates other than SPIFFE leaves).
    fn sign(
        &self,
        params: &CertificateParams,
        public_key: &PublicKey,
    ) -> Result<IssuedCertificate, IssueError> {
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(internal)?;
        inspected(cert.der().to_vec())
    }

    /// Re-check what was signed against what policy decided, before it leaves.
    fn recheck_spiffe_leaf(
        &self,
        facts: &CertFacts,
        identity: &SpiffeId,
        spki: &[u8],
        validity: Validity,
    ) -> Result<(), IssueError> {
        let expected = ExpectedSans {
            uri: Some(identity.as_str()),
            dns: &[],
            ips: &[],
        };
        self.recheck_leaf(facts, &expected, spki, validity)
    }

    /// What every leaf must be, whatever its names: exactly the expected SANs in a
    /// critical extension with an empty subject, not a CA, server and client auth, the
    /// validity decided, the requested key, this CA as issuer.
    fn recheck_leaf(
        &self,
        facts: &CertFacts,
        expected: &ExpectedSans<'_>,
        spki: &[u8],
        validity: Validity,
    ) -> Result<(), IssueError> {
        let fail = |what: &str| {
            Err(IssueError::Internal(format!(
                "issued certificate failed the re-check: {what}"
            )))
        };
        if !facts.uri_sans.iter().map(String::as_str).eq(expected.uri) {
            return fail("URI SAN is not exactly the caller's SPIFFE ID");
        }
        if !facts
            .dns_sans
            .iter()
            .map(String::as_str)
            .eq(expected.dns.iter().map(DnsName::as_str))
        {
            return fail("DNS SANs are not exactly the configured names");
        }
        let uris = usize::from(expected.uri.is_some());
        if facts.san_count != uris + expected.dns.len() + expected.ips.len() {
            return fail("unexpected SAN entries");
        }
        if !facts.subject_empty || !facts.san_critical {
            return fail("subject must be empty with a critical SAN");
        }
        if facts.is_ca || facts.ku_ca_usages || !facts.ku_digital_signature {
            return fail("key usage or basic constraints");
        }
        if !facts.ekus.iter().any(|e| e == x509::EKU_SERVER_AUTH)
            || !facts.ekus.iter().any(|e| e == x509::EKU_CLIENT_AUTH)
        {
            return fail("extended key usage");
        }
        if facts.not_before != validity.not_before
            || facts.not_after != validity.not_after
            || facts.not_after > self.facts.not_after
        {
            return fail("validity");
        }
        if facts.spki_der != spki {
            return fail("public key differs from the CSR's");
        }
        if facts.issuer_der != self.facts.subject_der {
            return fail("issuer name");
        }
        Ok(())
    }
}

/// The SANs a leaf must carry, in order (IP addresses are counted, not compared: the
/// certificate readers do not decode them).
struct ExpectedSans<'a> {
    uri: Option<&'a str>,
    dns: &'a [DnsName],
    ips: &'a [std::net::IpAddr],
}

fn dns_sans(names: &[DnsName]) -> Result<Vec<SanType>, IssueError> {
    names
        .iter()
        .map(|n| Ok(SanType::DnsName(n.as_str().try_into().map_err(internal)?)))
        .collect()
}

/// The template of a leaf, from policy and identity only: empty subject (so the SAN is
/// critical, which rcgen does), `cA` false, server and client auth.
fn leaf_template(
    kind: KeyKind,
    sans: Vec<SanType>,
    validity: Validity,
    serial: SerialNumber,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = match kind {
        KeyKind::Rsa(_) => {
            vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ]
        }
        _ => vec![KeyUsagePurpose::DigitalSignature],
    };
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.serial_number = Some(serial);
    params
}

/// Signs one SPIFFE leaf with rcgen, for the CA's own public key, and reads from it what
/// every leaf of this CA shares.
fn prototype_profile(
    issuer: &Issuer<'static, SignerHandle>,
    key: &SignerHandle,
    facts: &CertFacts,
) -> Result<LeafProfile, AuthorityError> {
    let params = leaf_template(
        KeyKind::EcdsaP256,
        vec![SanType::URI(
            "spiffe://prototype.invalid/ns/default/sa/default".try_into()?,
        )],
        Validity {
            not_before: facts.not_before,
            not_after: facts.not_after,
        },
        SerialNumber::from_slice(&[0x40; 16]),
    );
    let prototype = params.signed_by(key, issuer)?;
    LeafProfile::from_prototype(prototype.der()).map_err(AuthorityError::Certificate)
}

/// Reads back a signed certificate for the re-check and the audit record.
fn inspected(der: Vec<u8>) -> Result<IssuedCertificate, IssueError> {
    let facts = x509::inspect(&der).map_err(IssueError::Internal)?;
    let spki_digest = ring::digest::digest(&ring::digest::SHA256, &facts.spki_der);
    Ok(issued(der, facts, spki_digest.as_ref()))
}

/// A signed certificate, its facts as read back, and the digests the audit records.
fn issued(der: Vec<u8>, facts: CertFacts, spki_sha256: &[u8]) -> IssuedCertificate {
    IssuedCertificate {
        spki_sha256: x509::hex(spki_sha256),
        cert_sha256: x509::sha256_hex(&der),
        der,
        facts,
    }
}

fn internal(e: impl fmt::Display) -> IssueError {
    IssueError::Internal(e.to_string())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rcgen::KeyPair;

    /// Leaves as [`CertificateAuthority::issue_for_key`] makes them, for every key type
    /// it signs for, with an identity long enough for long-form DER lengths and a
    /// validity past 2050 (GeneralizedTime).
    pub(crate) fn leaves_of_every_key_type() -> Vec<Vec<u8>> {
        use crate::keys::KeyAlgorithm;
        let now = OffsetDateTime::now_utc();
        let ca = CertificateAuthority::new_self_signed_root(
            KeyAlgorithm::EcdsaP256.generate().unwrap(),
            "cluster.local",
            now,
            Duration::from_secs(3600 * 24 * 365 * 30),
        )
        .unwrap();
        let id = SpiffeId::parse(&format!(
            "spiffe://cluster.local/ns/x/sa/{}",
            "a".repeat(200)
        ))
        .unwrap();
        [
            KeyAlgorithm::EcdsaP256,
            KeyAlgorithm::EcdsaP384,
            KeyAlgorithm::Rsa(2048),
        ]
        .into_iter()
        .map(|alg| {
            let key = PublicKey::of_key_pair(&alg.generate().unwrap()).unwrap();
            let ttl = Duration::from_secs(3600 * 24 * 365 * 29);
            ca.issue_for_key(&key, &id, ttl, now).unwrap().der
        })
        .collect()
    }

    fn root(now: OffsetDateTime) -> CertificateAuthority {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        CertificateAuthority::new_self_signed_root(
            key,
            "cluster.local",
            now,
            Duration::from_secs(3600 * 24),
        )
        .unwrap()
    }

    fn hostile_csr(alg: &'static rcgen::SignatureAlgorithm) -> (KeyPair, Vec<u8>) {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut params = CertificateParams::new(vec![
            "spiffe://cluster.local/ns/kube-system/sa/admin".into(),
        ])
        .unwrap();
        params.subject_alt_names.push(SanType::URI(
            "spiffe://cluster.local/ns/kube-system/sa/admin"
                .try_into()
                .unwrap(),
        ));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let csr = params.serialize_request(&key).unwrap();
        (key, csr.der().to_vec())
    }

    const POLICY: IssuancePolicy = IssuancePolicy {
        default_ttl: Duration::from_secs(3600),
        max_ttl: Duration::from_secs(86400),
        above_max: crate::policy::AboveMax::Refuse,
    };

    #[test]
    fn serials_are_positive_unique_and_time_ordered() {
        let rng = SystemRandom::new();
        let per_thread: Vec<Vec<[u8; 16]>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..2000).map(|_| fresh_serial(&rng).unwrap()).collect()))
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        for serials in &per_thread {
            for pair in serials.windows(2) {
                // Strictly increasing in issuance order, even within one nanosecond.
                assert!(pair[0][..8] < pair[1][..8], "{pair:02x?}");
            }
        }
        let all: Vec<[u8; 16]> = per_thread.concat();
        let clocks: std::collections::HashSet<_> = all.iter().map(|s| s[..8].to_vec()).collect();
        let randoms: std::collections::HashSet<_> = all.iter().map(|s| s[8..].to_vec()).collect();
        assert_eq!(
            clocks.len(),
            all.len(),
            "the clock half is unique across threads"
        );
        assert_eq!(randoms.len(), all.len(), "the random half is random");
        for s in &all {
            // Positive, no leading zero: a 16-byte DER INTEGER.
            assert!((0x40..0x80).contains(&s[0]), "{s:02x?}");
        }
        // The clock is the wall clock, in nanoseconds.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let first = u64::from_be_bytes(all[0][..8].try_into().unwrap()) & ((1 << 62) - 1);
        assert!(now.abs_diff(first) < 60_000_000_000);
        assert_eq!(serial_clock_nanos(&x509::hex(&all[0])), Some(first));
        assert_eq!(serial_clock_nanos("abc"), None);
        assert_eq!(serial_clock_nanos(&"f".repeat(32)), None);
    }

    #[test]
    fn identity_comes_from_caller_not_csr() {
        let now = OffsetDateTime::now_utc();
        let ca = root(now);
        let (key, csr) = hostile_csr(&rcgen::PKCS_ECDSA_P384_SHA384);
        let id = SpiffeId::parse("spiffe://cluster.local/ns/vm/sa/mysqldb").unwrap();
        let issued = ca.issue_from_csr(&csr, &id, 0, &POLICY, now).unwrap();
        assert_eq!(issued.facts.uri_sans, vec![id.to_string()]);
        assert!(!issued.facts.is_ca && !issued.facts.ku_ca_usages);
        assert_eq!(issued.facts.spki_der, key.subject_public_key_info());
        assert!(issued.facts.serial.len() >= 16);
        // The re-check's parser and a second one read the same leaf.
        let mut second = x509::tests::facts_by_x509_cert(&issued.der);
        let mut facts = issued.facts.clone();
        second.ekus.sort();
        facts.ekus.sort();
        assert_eq!(facts, second);
    }

    #[test]
    fn leaf_clamped_to_signer_and_ttl_checked() {
        let now = OffsetDateTime::now_utc();
        let ca = root(now);
        let (_, csr) = hostile_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let policy = IssuancePolicy {
            max_ttl: Duration::from_secs(3600 * 48),
            above_max: crate::policy::AboveMax::Refuse,
            ..POLICY
        };
        let issued = ca
            .issue_from_csr(&csr, &id, 3600 * 48, &policy, now)
            .unwrap();
        assert_eq!(issued.facts.not_after, ca.facts().not_after);
        assert!(matches!(
            ca.issue_from_csr(&csr, &id, 3600 * 25, &POLICY, now),
            Err(IssueError::TtlTooLong { .. })
        ));
    }

    /// The direct leaf encoder writes exactly what rcgen writes for the same template,
    /// for every CA key type and every leaf key type.
    #[test]
    fn leaf_encoder_matches_rcgen_byte_for_byte() {
        use crate::keys::KeyAlgorithm;
        use der::Decode;
        let now = OffsetDateTime::now_utc();
        let rsa_ca = KeyAlgorithm::Rsa(2048).generate().unwrap();
        let rsa_leaf =
            PublicKey::of_key_pair(&KeyAlgorithm::Rsa(2048).generate().unwrap()).unwrap();
        // Long enough (over 127 bytes) that the SAN's lengths take the long DER form, as
        // a 253-character service account name would.
        let id = SpiffeId::parse(&format!(
            "spiffe://cluster.local/ns/some-namespace/sa/{}",
            "a".repeat(200)
        ))
        .unwrap();
        assert!(id.as_str().len() > 127);
        for ca_key in [
            KeyAlgorithm::EcdsaP256.generate().unwrap(),
            KeyAlgorithm::EcdsaP384.generate().unwrap(),
            rsa_ca,
        ] {
            let ca = CertificateAuthority::new_self_signed_root(
                ca_key,
                "cluster.local",
                now,
                Duration::from_secs(3600 * 24 * 365 * 30),
            )
            .unwrap();
            for leaf_key in [
                PublicKey::of_key_pair(&KeyAlgorithm::EcdsaP256.generate().unwrap()).unwrap(),
                PublicKey::of_key_pair(&KeyAlgorithm::EcdsaP384.generate().unwrap()).unwrap(),
                rsa_leaf.clone(),
            ] {
                // A validity that crosses 2050 covers both time encodings.
                let validity = Validity {
                    not_before: now - Duration::from_secs(60),
                    not_after: ca.facts().not_after,
                };
                let serial = fresh_serial(&ca.rng).unwrap();
                let reference = leaf_template(
                    leaf_key.kind,
                    vec![SanType::URI(id.as_str().try_into().unwrap())],
                    validity,
                    SerialNumber::from_slice(&serial),
                )
                .signed_by(&leaf_key, &ca.issuer)
                .unwrap();
                let reference = reference.der().to_vec();
                let spki = leaf_key.spki_der();
                let tbs = ca.leaf.tbs(
                    &serial,
                    validity,
                    &spki,
                    ring::digest::digest(&ring::digest::SHA256, &spki).as_ref(),
                    leaf_key.kind,
                    id.as_str(),
                );
                assert_eq!(
                    tbs,
                    csr::raw_info_bytes(&reference).unwrap(),
                    "TBSCertificate differs: CA {:?}, leaf {:?}",
                    ca.facts().spki_der.len(),
                    leaf_key
                );
                let parsed = x509_cert::Certificate::from_der(&reference).unwrap();
                let signature = parsed.signature().raw_bytes();
                assert_eq!(ca.leaf.certificate(&tbs, signature), reference);
            }
        }
    }

    #[test]
    fn refuses_mismatched_key() {
        let now = OffsetDateTime::now_utc();
        let ca = root(now);
        let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let err = CertificateAuthority::from_parts(
            ca.cert_der().to_vec(),
            other,
            vec![],
            ca.roots().to_vec(),
        )
        .unwrap_err();
        assert!(matches!(err, AuthorityError::KeyMismatch));
    }

    /// A SPIFFE leaf with operator-given DNS names: the URI first, then the names in
    /// order, read alike by both certificate readers; a server certificate names only
    /// what it was given.
    #[test]
    fn dns_names_follow_the_spiffe_id_and_nothing_else_is_added() {
        let now = OffsetDateTime::now_utc();
        let ca = root(now);
        let key =
            PublicKey::of_key_pair(&KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap())
                .unwrap();
        let id = SpiffeId::parse(
            "spiffe://cluster.local/ns/istio-system/sa/istio-galley-service-account",
        )
        .unwrap();
        let names: Vec<DnsName> = ["istio-galley.istio-system.svc", "istio-galley.istio-system"]
            .iter()
            .map(|n| DnsName::parse(n).unwrap())
            .collect();
        let ttl = Duration::from_secs(3600);
        let leaf = ca
            .issue_for_key_with_dns(&key, &id, &names, ttl, now)
            .unwrap();
        assert_eq!(leaf.facts.uri_sans, vec![id.as_str().to_owned()]);
        assert_eq!(
            leaf.facts.dns_sans,
            vec!["istio-galley.istio-system.svc", "istio-galley.istio-system"]
        );
        assert_eq!(leaf.facts.san_count, 3);
        assert!(leaf.facts.san_critical && leaf.facts.subject_empty && !leaf.facts.is_ca);
        assert_eq!(crate::reread::read(&leaf.der).unwrap(), leaf.facts);
        assert!(crate::statement::is_signed_by(ca.cert_der(), &leaf.der));

        let plain = ca.issue_for_key_with_dns(&key, &id, &[], ttl, now).unwrap();
        assert!(plain.facts.dns_sans.is_empty());
        assert_eq!(plain.facts.san_count, 1);

        let ip: std::net::IpAddr = "10.1.2.3".parse().unwrap();
        let server = ca
            .issue_server_cert(&key, &names[..1], &[ip], ttl, now)
            .unwrap();
        assert!(server.facts.uri_sans.is_empty());
        assert_eq!(server.facts.dns_sans, vec!["istio-galley.istio-system.svc"]);
        assert_eq!(server.facts.san_count, 2);
        assert!(ca.issue_server_cert(&key, &[], &[], ttl, now).is_err());
    }
}
