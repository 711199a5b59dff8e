//! A stand-in CA that answers `CreateCertificate` correctly or wrongly on demand, to
//! check that the agent verifies answers before publishing them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ca_core::{CertificateAuthority, SpiffeId};
use istio_ca_proto::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use istio_ca_proto::{IstioCertificateRequest, IstioCertificateResponse};
use time::OffsetDateTime;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

/// How the fake answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A correct certificate for the caller's identity and key.
    Good,
    /// A certificate for another SPIFFE ID.
    ForeignIdentity,
    /// A certificate from a root the agent does not trust.
    UnknownRoot,
    /// A certificate for a key the agent did not send.
    OtherKey,
}

struct Inner {
    ca: CertificateAuthority,
    stranger: CertificateAuthority,
    mode: Mutex<Mode>,
    served: AtomicUsize,
}

/// A running fake CA.
pub struct FakeCa {
    /// Its gRPC address (TLS name `istio-ca`).
    pub addr: SocketAddr,
    /// A bootstrap bundle for `spiffe://cluster.local/ns/vm/sa/db` it accepts.
    pub bootstrap: PathBuf,
    inner: Arc<Inner>,
}

fn new_ca() -> CertificateAuthority {
    let key = rcgen::KeyPair::generate().unwrap();
    CertificateAuthority::new_self_signed_root(
        key,
        "cluster.local",
        OffsetDateTime::now_utc(),
        Duration::from_secs(86400),
    )
    .unwrap()
}

fn fresh_public_key() -> ca_core::keys::PublicKey {
    ca_core::keys::PublicKey::of_key_pair(&rcgen::KeyPair::generate().unwrap()).unwrap()
}

const IDENTITY: &str = "spiffe://cluster.local/ns/vm/sa/db";

impl FakeCa {
    /// Starts on 127.0.0.1 with a bootstrap bundle written under `dir`.
    pub async fn start(dir: &Path) -> FakeCa {
        crate::install_crypto();
        let ca = new_ca();
        let now = OffsetDateTime::now_utc();
        let root_pem = ca_core::pem::certificate(ca.cert_der());

        let bootstrap = dir.join("fake-bootstrap");
        std::fs::create_dir_all(&bootstrap).unwrap();
        let client_key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&client_key)
            .unwrap();
        let id = SpiffeId::parse(IDENTITY).unwrap();
        let leaf = ca
            .issue_from_csr(csr.der(), &id, 3600, &policy(), now)
            .unwrap();
        std::fs::write(bootstrap.join("key.pem"), client_key.serialize_pem()).unwrap();
        std::fs::write(
            bootstrap.join("cert-chain.pem"),
            format!("{}{root_pem}", leaf.pem()),
        )
        .unwrap();
        std::fs::write(bootstrap.join("root-cert.pem"), &root_pem).unwrap();

        let server_key = rcgen::KeyPair::generate().unwrap();
        let server_pub = ca_core::keys::PublicKey::of_key_pair(&server_key).unwrap();
        let serving = ca
            .issue_server_cert(
                &server_pub,
                &[ca_core::DnsName::parse("istio-ca").unwrap()],
                &[],
                Duration::from_secs(3600),
                now,
            )
            .unwrap();

        let inner = Arc::new(Inner {
            ca,
            stranger: new_ca(),
            mode: Mutex::new(Mode::Good),
            served: AtomicUsize::new(0),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(
                format!("{}{root_pem}", serving.pem()),
                server_key.serialize_pem(),
            ))
            .client_ca_root(Certificate::from_pem(&root_pem))
            .client_auth_optional(true);
        let svc = IstioCertificateServiceServer::new(Handler(inner.clone()));
        tokio::spawn(async move {
            Server::builder()
                .tls_config(tls)
                .unwrap()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        FakeCa {
            addr,
            bootstrap,
            inner,
        }
    }

    /// Switches how it answers.
    pub fn set_mode(&self, mode: Mode) {
        *self.inner.mode.lock().unwrap() = mode;
    }

    /// How many requests it answered.
    pub fn served(&self) -> usize {
        self.inner.served.load(Ordering::SeqCst)
    }
}

fn policy() -> ca_core::IssuancePolicy {
    ca_core::IssuancePolicy {
        default_ttl: Duration::from_secs(3600),
        max_ttl: Duration::from_secs(86400),
        above_max: ca_core::policy::AboveMax::Refuse,
    }
}

struct Handler(Arc<Inner>);

#[tonic::async_trait]
impl IstioCertificateService for Handler {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let req = request.into_inner();
        let mode = *self.0.mode.lock().unwrap();
        let key = ca_core::csr::verify(req.csr.as_bytes())
            .map_err(|e| Status::invalid_argument(e.to_string()))?
            .public_key;
        let ttl = Duration::from_secs(req.validity_duration.max(1) as u64);
        let now = OffsetDateTime::now_utc();
        let (ca, id, key) = match mode {
            Mode::Good => (&self.0.ca, IDENTITY, key),
            Mode::ForeignIdentity => (
                &self.0.ca,
                "spiffe://cluster.local/ns/kube-system/sa/admin",
                key,
            ),
            Mode::UnknownRoot => (&self.0.stranger, IDENTITY, key),
            Mode::OtherKey => (&self.0.ca, IDENTITY, fresh_public_key()),
        };
        let leaf = ca
            .issue_for_key(&key, &SpiffeId::parse(id).unwrap(), ttl, now)
            .map_err(|e| Status::internal(e.to_string()))?;
        self.0.served.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: vec![leaf.pem(), ca_core::pem::certificate(ca.cert_der())],
        }))
    }
}
