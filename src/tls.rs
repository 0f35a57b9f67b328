//! TLS trust policies, in one place, for NBD and XenAPI connections.
//!
//! * `--tls-ca FILE`: a PEM bundle of trust anchors. A self-signed leaf without
//!   basicConstraints (how XenServer's certificates look) works as its own anchor.
//! * `--tls-cert FILE`: trust exactly this leaf certificate, by DER equality. This is how the
//!   `cert` returned by `VDI.get_nbd_info` is used.
//! * `--tls-pin SHA256`: trust the leaf whose DER has this SHA-256 (hex).
//! * none of these: the system's trust store.
//! * `--tls-insecure-no-verify`: accept any certificate (loud in the log).
//!
//! Signatures on the handshake are always verified with the provider's algorithms; the exact
//! policies (cert, pin) replace only the chain and name checks.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CipherSuite, ClientConfig, DigitallySignedStruct, SignatureScheme};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path}: invalid PEM: {why}")]
    BadPem { path: PathBuf, why: String },
    #[error("certificate in {path} is not usable as a trust anchor: {why}")]
    BadAnchor { path: PathBuf, why: String },
    #[error("a certificate pin must be 64 hex digits, optionally ':'-separated (the SHA-256 of the server certificate's DER)")]
    BadPin,
    #[error("the certificate is not valid X.509: {0}")]
    BadCertificate(String),
    #[error("the certificate is not issued for {subject:?} (neither a subjectAltName nor, without those, the subject CN matches)")]
    SubjectMismatch { subject: String },
    #[error("invalid TLS server name {0:?}")]
    BadServerName(String),
    #[error(
        "no usable certificate in the system trust store; give --tls-ca, --tls-cert or --tls-pin"
    )]
    NoSystemRoots,
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// How the server's certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    System,
    CaFile(PathBuf),
    /// Exactly this leaf certificate (DER).
    ExactCert(Vec<u8>),
    /// SHA-256 of the leaf certificate's DER.
    Pin([u8; 32]),
    InsecureNoVerify,
}

impl Trust {
    /// The leaf certificate from a PEM file, for [`Trust::ExactCert`].
    pub fn exact_cert_from_file(path: &std::path::Path) -> Result<Trust, TlsError> {
        let pem = std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.into(),
            source,
        })?;
        Trust::exact_cert_from_pem(&pem, path)
    }

    /// The first certificate of a PEM text (as `get_nbd_info` returns it).
    pub fn exact_cert_from_pem(pem: &[u8], origin: &std::path::Path) -> Result<Trust, TlsError> {
        first_cert_der(pem, origin).map(Trust::ExactCert)
    }

    /// Parse a certificate pin: 64 hex digits, optionally separated by ':'. Any other input
    /// (odd length, non-ASCII, non-hex) is [`TlsError::BadPin`], never a panic.
    pub fn pin_from_hex(text: &str) -> Result<Trust, TlsError> {
        let digits: Vec<u8> = text.bytes().filter(|&b| b != b':').collect();
        if digits.len() != 64 {
            return Err(TlsError::BadPin);
        }
        let mut pin = [0u8; 32];
        for (byte, pair) in pin.iter_mut().zip(digits.chunks_exact(2)) {
            let digit = |b: u8| char::from(b).to_digit(16).ok_or(TlsError::BadPin);
            *byte = (digit(pair[0])? << 4 | digit(pair[1])?) as u8;
        }
        Ok(Trust::Pin(pin))
    }

    /// Trust the certificate of a `VDI.get_nbd_info` record: the first certificate of `pem`,
    /// provided `subject` names it. XenServer derives `subject` from the certificate's
    /// subjectAltName entries (DNS names and IP addresses), else its subject CN; a record
    /// whose subject does not name its own certificate is inconsistent and is refused.
    pub fn exact_cert_for_subject(pem: &[u8], subject: &str) -> Result<Trust, TlsError> {
        let origin = std::path::Path::new("the get_nbd_info record");
        let der = first_cert_der(pem, origin)?;
        if !cert_names(&der)?.iter().any(|n| n.matches(subject)) {
            return Err(TlsError::SubjectMismatch {
                subject: subject.to_string(),
            });
        }
        Ok(Trust::ExactCert(der))
    }
}

/// The DER of the first certificate of a PEM text.
fn first_cert_der(pem: &[u8], origin: &std::path::Path) -> Result<Vec<u8>, TlsError> {
    let first = CertificateDer::pem_slice_iter(pem)
        .next()
        .ok_or_else(|| TlsError::NoCertificate {
            path: origin.into(),
        })?
        .map_err(|e| TlsError::BadPem {
            path: origin.into(),
            why: e.to_string(),
        })?;
    Ok(first.to_vec())
}

/// A name a certificate is issued for.
#[derive(Debug, PartialEq, Eq)]
enum CertName {
    Dns(String),
    Ip(std::net::IpAddr),
}

impl CertName {
    /// DNS names compare ASCII case-insensitively and literally (a wildcard matches only the
    /// same wildcard); IP addresses compare as addresses.
    fn matches(&self, subject: &str) -> bool {
        match self {
            CertName::Dns(name) => name.eq_ignore_ascii_case(subject),
            CertName::Ip(ip) => {
                let bare = subject.trim_start_matches('[').trim_end_matches(']');
                bare.parse::<std::net::IpAddr>().is_ok_and(|s| s == *ip)
            }
        }
    }
}

/// The names a certificate is issued for: its SAN DNS names and IP addresses, or, when it
/// has no SAN extension, its subject common names.
fn cert_names(der: &[u8]) -> Result<Vec<CertName>, TlsError> {
    use x509_parser::extensions::GeneralName;
    let bad = |why: String| TlsError::BadCertificate(why);
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| bad(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| bad(format!("subjectAltName: {e}")))?;
    if let Some(san) = san {
        let mut names = Vec::new();
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => names.push(CertName::Dns(dns.to_string())),
                GeneralName::IPAddress(bytes) => {
                    let ip = match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes).ok().map(std::net::IpAddr::from),
                        16 => <[u8; 16]>::try_from(*bytes)
                            .ok()
                            .map(std::net::IpAddr::from),
                        _ => None,
                    };
                    names.extend(ip.map(CertName::Ip));
                }
                _ => {}
            }
        }
        return Ok(names);
    }
    Ok(cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .map(|cn| CertName::Dns(cn.to_string()))
        .collect())
}

/// The policy the command-line flags ask for. At most one is given (clap groups enforce it);
/// none means the system's trust store. Shared by the NBD and the XenAPI flags.
pub fn trust_from_flags(
    ca: Option<&std::path::Path>,
    cert: Option<&std::path::Path>,
    pin: Option<&str>,
    insecure: bool,
) -> Result<Trust, TlsError> {
    Ok(if let Some(ca) = ca {
        Trust::CaFile(ca.to_path_buf())
    } else if let Some(cert) = cert {
        Trust::exact_cert_from_file(cert)?
    } else if let Some(pin) = pin {
        Trust::pin_from_hex(pin)?
    } else if insecure {
        // client_config() warns loudly when this policy is used.
        Trust::InsecureNoVerify
    } else {
        Trust::System
    })
}

/// The crypto provider: ring, with its default suites (TLS 1.3 and 1.2, including
/// ECDHE-RSA AES-GCM on secp384r1, which is all XenServer's NBD server offers), AES-128-GCM
/// offered first. Servers that honour the client's order (GnuTLS, as in qemu-nbd and nbdkit,
/// does by default) then spend 10 AES rounds a block instead of 14 on every byte of the disk,
/// on both ends; AES-128-GCM is TLS 1.3's mandatory suite and the first choice of Go's TLS.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| (s.tls13().is_none(), !is_aes128_gcm(s.suite())));
    Arc::new(provider)
}

fn is_aes128_gcm(suite: CipherSuite) -> bool {
    matches!(
        suite,
        CipherSuite::TLS13_AES_128_GCM_SHA256
            | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
    )
}

/// Build a client configuration for one trust policy.
pub fn client_config(trust: &Trust) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let config = match trust {
        Trust::System => {
            let mut roots = rustls::RootCertStore::empty();
            let loaded = rustls_native_certs::load_native_certs();
            for cert in loaded.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(TlsError::NoSystemRoots);
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::CaFile(path) => {
            let pem = std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.clone(),
                source,
            })?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| TlsError::BadPem {
                    path: path.clone(),
                    why: e.to_string(),
                })?;
                roots.add(cert).map_err(|e| TlsError::BadAnchor {
                    path: path.clone(),
                    why: e.to_string(),
                })?;
            }
            if roots.is_empty() {
                return Err(TlsError::NoCertificate { path: path.clone() });
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::ExactCert(der) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ExactVerifier {
                expect: Expect::Der(der.clone()),
                provider,
            }))
            .with_no_client_auth(),
        Trust::Pin(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ExactVerifier {
                expect: Expect::Sha256(*pin),
                provider,
            }))
            .with_no_client_auth(),
        Trust::InsecureNoVerify => {
            tracing::warn!(
                "TLS certificate verification is DISABLED: the server is not authenticated"
            );
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ExactVerifier {
                    expect: Expect::Anything,
                    provider,
                }))
                .with_no_client_auth()
        }
    };
    Ok(Arc::new(config))
}

/// Parse a server name for SNI and certificate checks (a DNS name or an IP address).
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(bare.to_string()).map_err(|_| TlsError::BadServerName(name.to_string()))
}

/// SHA-256 of a DER certificate, as lowercase hex (what `--tls-pin` takes).
pub fn sha256_hex(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug)]
enum Expect {
    Der(Vec<u8>),
    Sha256([u8; 32]),
    Anything,
}

/// Accepts exactly one certificate (by DER or by hash); the name is not checked because the
/// identity is the certificate itself.
#[derive(Debug)]
struct ExactVerifier {
    expect: Expect,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ExactVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok = match &self.expect {
            Expect::Der(der) => end_entity.as_ref() == der.as_slice(),
            Expect::Sha256(pin) => {
                ring::digest::digest(&ring::digest::SHA256, end_entity.as_ref()).as_ref() == pin
            }
            Expect::Anything => true,
        };
        if ok {
            Ok(ServerCertVerified::assertion())
        } else {
            let what = match self.expect {
                Expect::Sha256(_) => "does not match --tls-pin",
                _ => "is not the expected certificate",
            };
            let msg = format!(
                "server certificate (sha256 {}) {what}",
                sha256_hex(end_entity.as_ref())
            );
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(
                    std::io::Error::other(msg),
                ))),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A readable reason from a TLS handshake I/O error (rustls puts its error inside).
pub fn describe_io_error(e: &std::io::Error) -> String {
    match e.get_ref() {
        Some(inner) => inner.to_string(),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes128_gcm_is_offered_first_for_each_version() {
        let provider = provider();
        let suites = &provider.cipher_suites;
        assert_eq!(suites[0].suite(), CipherSuite::TLS13_AES_128_GCM_SHA256);
        let first12 = suites.iter().find(|s| s.tls13().is_none()).unwrap();
        assert!(is_aes128_gcm(first12.suite()));
        // Nothing is dropped: every default suite is still offered.
        assert_eq!(
            suites.len(),
            rustls::crypto::ring::default_provider().cipher_suites.len()
        );
    }

    #[test]
    fn pins_parse() {
        let hex = "00".repeat(31) + "ff";
        assert_eq!(
            Trust::pin_from_hex(&hex).unwrap(),
            Trust::Pin({
                let mut p = [0u8; 32];
                p[31] = 0xff;
                p
            })
        );
        assert!(Trust::pin_from_hex("abc").is_err());
        assert!(Trust::pin_from_hex(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn bad_pins_are_errors_not_panics() {
        let ok = "ab".repeat(32);
        assert!(Trust::pin_from_hex(&ok).is_ok());
        let colons = ["ab"; 32].join(":");
        assert!(Trust::pin_from_hex(&colons).is_ok());
        // 64 bytes whose byte-index pairs split a multibyte character (used to panic).
        let multibyte = "€".repeat(21) + "a";
        for bad in [
            multibyte.as_str(),
            "a",
            &"a".repeat(63),
            &"+1".repeat(32),
            "",
        ] {
            assert!(
                matches!(Trust::pin_from_hex(bad), Err(TlsError::BadPin)),
                "{bad:?}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn pin_and_server_name_parsers_never_panic(text in ".*") {
            let _ = Trust::pin_from_hex(&text);
            let _ = server_name(&text);
        }

        #[test]
        fn pin_parser_accepts_any_sha256(bytes in proptest::array::uniform32(0u8..)) {
            let hex: String = bytes.iter().map(|b| format!("{b:02X}")).collect();
            proptest::prop_assert_eq!(Trust::pin_from_hex(&hex).unwrap(), Trust::Pin(bytes));
        }
    }

    fn subject_check(cn: &str, sans: &[&str], subject: &str) -> Result<Trust, TlsError> {
        let pem = cbtstream_testkit::certs::self_signed_pem(cn, sans).unwrap();
        Trust::exact_cert_for_subject(pem.as_bytes(), subject)
    }

    #[test]
    fn subject_matches_a_san_dns_name_case_insensitively() {
        let sans = ["host-a.example", "host-b.example"];
        assert!(matches!(
            subject_check("ignored", &sans, "HOST-B.example"),
            Ok(Trust::ExactCert(_))
        ));
        // With SANs present, the CN does not count.
        assert!(matches!(
            subject_check("cn.example", &sans, "cn.example"),
            Err(TlsError::SubjectMismatch { .. })
        ));
    }

    #[test]
    fn subject_matches_the_cn_only_without_sans() {
        assert!(subject_check("xen-host-1", &[], "xen-host-1").is_ok());
        let err = subject_check("xen-host-1", &[], "xen-host-2").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the certificate is not issued for \"xen-host-2\" (neither a subjectAltName nor, \
             without those, the subject CN matches)"
        );
    }

    #[test]
    fn wildcard_subject_matches_only_the_same_wildcard() {
        assert!(subject_check("x", &["*.pool.example"], "*.pool.example").is_ok());
        assert!(subject_check("x", &["*.pool.example"], "host.pool.example").is_err());
        assert!(subject_check("x", &["host.pool.example"], "*.pool.example").is_err());
    }

    #[test]
    fn subject_matches_a_san_ip_address() {
        let sans = ["192.0.2.7", "2001:db8::1"];
        assert!(subject_check("x", &sans, "192.0.2.7").is_ok());
        assert!(subject_check("x", &sans, "2001:DB8:0::1").is_ok());
        assert!(subject_check("x", &sans, "[2001:db8::1]").is_ok());
        assert!(subject_check("x", &sans, "192.0.2.8").is_err());
    }

    #[test]
    fn bad_pem_is_an_error() {
        let garbled = "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            Trust::exact_cert_for_subject(garbled.as_bytes(), "h"),
            Err(TlsError::BadPem { .. })
        ));
        assert!(matches!(
            Trust::exact_cert_for_subject(b"no pem here", "h"),
            Err(TlsError::NoCertificate { .. })
        ));
        // Valid base64 that is not a certificate.
        let junk = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            Trust::exact_cert_for_subject(junk.as_bytes(), "h"),
            Err(TlsError::BadCertificate(_))
        ));
    }
}
