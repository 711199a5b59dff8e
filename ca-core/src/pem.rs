//! Minimal PEM framing for certificates and requests (RFC 7468).

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// At least the length of [`encode`]'s output: frame lines, then per 48 bytes of DER a
/// line of 64 characters and its LF.
fn encoded_len_bound(label: &str, der_len: usize) -> usize {
    2 * label.len() + 32 + 65 * der_len.div_ceil(48)
}

/// RFC 7468 text: BEGIN line, base64 in lines of 64 characters, END line, each ending
/// in LF. Written in one pass into one allocation (the leaf of every answer goes
/// through here).
fn encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let mut out = String::with_capacity(encoded_len_bound(label, der.len()));
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for line in der.chunks(48) {
        base64::engine::general_purpose::STANDARD.encode_string(line, &mut out);
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
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

/// The DER of a CSR given as PEM (`CERTIFICATE REQUEST` or `NEW CERTIFICATE REQUEST`,
/// which some older tools emit). Text around the block is ignored; inside it, line
/// breaks and other whitespace are.
///
/// This runs on every request, so it decodes with the `base64` crate rather than a
/// constant-time decoder: a CSR holds nothing secret, and this is twice as fast.
pub fn parse_csr(pem: &[u8]) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let text = std::str::from_utf8(pem).map_err(|_| "CSR is not text".to_string())?;
    /// Label, BEGIN line, END line.
    const BLOCKS: [(&str, &str, &str); 2] = [
        (
            "CERTIFICATE REQUEST",
            "-----BEGIN CERTIFICATE REQUEST-----",
            "-----END CERTIFICATE REQUEST-----",
        ),
        (
            "NEW CERTIFICATE REQUEST",
            "-----BEGIN NEW CERTIFICATE REQUEST-----",
            "-----END NEW CERTIFICATE REQUEST-----",
        ),
    ];
    let (label, start, end) = BLOCKS
        .into_iter()
        .find_map(|(label, begin, end)| text.find(begin).map(|at| (label, at + begin.len(), end)))
        .ok_or("no PEM CERTIFICATE REQUEST block")?;
    let len = text[start..]
        .find(end)
        .ok_or_else(|| format!("PEM {label} block has no END line"))?;
    let mut body = Vec::with_capacity(len);
    for piece in text.as_bytes()[start..start + len].split(u8::is_ascii_whitespace) {
        body.extend_from_slice(piece);
    }
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|e| format!("PEM {label} block is not base64: {e}"))
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

    #[test]
    fn encodes_as_the_pem_crate_does() {
        let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
        for len in [0, 1, 2, 3, 47, 48, 49, 95, 96, 97, 700, 1217] {
            let der: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            for label in ["CERTIFICATE", "PRIVATE KEY", "CERTIFICATE REQUEST"] {
                let ours = super::encode(label, &der);
                assert_eq!(
                    ours,
                    pem::encode_config(&pem::Pem::new(label, der.clone()), config)
                );
                assert!(
                    ours.len() <= super::encoded_len_bound(label, len),
                    "one allocation"
                );
            }
        }
    }

    #[test]
    fn csr_pem_in_every_shape_tools_emit() {
        let der: Vec<u8> = (0..=255u8).cycle().take(700).collect();
        let pem = super::csr(&der);
        assert_eq!(super::parse_csr(pem.as_bytes()).unwrap(), der);
        let crlf = format!("preamble\r\n{}", pem.replace('\n', "\r\n"));
        assert_eq!(super::parse_csr(crlf.as_bytes()).unwrap(), der);
        let old = pem.replace("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST");
        assert_eq!(super::parse_csr(old.as_bytes()).unwrap(), der);

        for (bad, why) in [
            (
                pem.replace("-----END CERTIFICATE REQUEST-----", ""),
                "END line",
            ),
            (pem.replace("CERTIFICATE REQUEST", "CERTIFICATE"), "no PEM"),
            (pem.replacen("-----\n", "-----\n*", 1), "not base64"),
        ] {
            let err = super::parse_csr(bad.as_bytes()).unwrap_err();
            assert!(err.contains(why), "{why}: {err}");
        }
        assert!(super::parse_csr(&[0xff, 0xfe]).is_err());
    }
}
