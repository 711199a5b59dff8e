//! The gRPC wire contract shared by the CA server, the node agent and the tests.
//!
//! Both of Istio's CA APIs live in the proto package `istio.v1.auth`:
//! - `IstioCertificateService/CreateCertificate` (modern, every Istio proxy), and
//! - `IstioCAService/HandleCSR` (legacy, the 2017–2019 VM node agents).
#![forbid(unsafe_code)]

/// Generated code for package `istio.v1.auth`.
#[allow(clippy::all, missing_docs)]
pub mod istio {
    pub mod v1 {
        pub mod auth {
            tonic::include_proto!("istio.v1.auth");
        }
    }
}

/// Generated code for `google.rpc.Status`.
#[allow(clippy::all, missing_docs)]
pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

pub use istio::v1::auth::*;

/// Full gRPC path of the modern API's only method.
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";
/// Full gRPC path of the legacy API's only method.
pub const HANDLE_CSR_PATH: &str = "/istio.v1.auth.IstioCAService/HandleCSR";
