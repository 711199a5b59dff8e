//! Minimal PEM framing for certificates and requests (RFC 7468).

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};

fn encode(label: &str, der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(label, der), config)
}

/// PEM of one DER certificate.
pub fn certificate(der: &[u8]) -> String {
    encode("CERTIFICATE", der)
}

/// PEM of a PKCS#8 private key. Callers own the secrecy of the result.
pub fn private_key(pkcs8_der: &[u8]) -> String {
    encode("PRIVATE KEY", pkcs8_der)
}

/// PEM of a certificate signing request.
pub fn csr(der: &[u8]) -> String {
    encode("CERTIFICATE REQUEST", der)
}

/// Every `CERTIFICATE` block of a PEM text, in order. Other blocks are skipped.
pub fn parse_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
    let certs = certs.map_err(|e| format!("invalid PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block found".into());
    }
    Ok(certs)
}

/// The DER of a CSR given as PEM (`CERTIFICATE REQUEST` or `NEW CERTIFICATE REQUEST`).
pub fn parse_csr(pem: &[u8]) -> Result<Vec<u8>, String> {
    let text = std::str::from_utf8(pem).map_err(|_| "CSR is not text".to_string())?;
    // Some older tools emit the "NEW CERTIFICATE REQUEST" label.
    let normalised;
    let text = if text.contains("-----BEGIN NEW CERTIFICATE REQUEST-----") {
        normalised = text.replace("NEW CERTIFICATE REQUEST", "CERTIFICATE REQUEST");
        normalised.as_str()
    } else {
        text
    };
    CertificateSigningRequestDer::from_pem_slice(text.as_bytes())
        .map(|d| d.as_ref().to_vec())
        .map_err(|e| format!("no PEM CERTIFICATE REQUEST block: {e}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn certificate_pem_round_trips() {
        let der = vec![0x30, 0x03, 0x02, 0x01, 0x05];
        let text = super::certificate(&der);
        assert!(text.starts_with("-----BEGIN CERTIFICATE-----\n"));
        let back = super::parse_certificates(text.as_bytes()).unwrap();
        assert_eq!(back[0].as_ref(), der.as_slice());
    }
}
