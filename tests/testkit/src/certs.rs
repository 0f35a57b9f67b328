//! Test certificates.
//!
//! * [`TestPki`]: a CA (basicConstraints CA:TRUE) that signs a server leaf for `localhost` /
//!   `127.0.0.1` (and a client leaf for mutual-TLS tests). The files are laid out the way
//!   qemu's `tls-creds-x509,dir=` and `nbdkit --tls-certificates=` want them, and the same
//!   directory also works as libnbd's `tls-certificates=` directory (libnbd reads
//!   `ca-cert.pem`; it only presents a client certificate if `client-cert.pem` +
//!   `client-key.pem` exist, which they do not in [`TestPki::dir`]).
//! * [`xapi_style_self_signed`]: a self-signed RSA-2048 leaf without basicConstraints, the
//!   shape of XenServer's `/etc/xensource/xapi-ssl.pem` certificate.
//! * [`rustls_server_config`] / [`rustls_client_config`]: rustls configs for Rust test
//!   servers and clients (ring provider).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// File names used by qemu (`tls-creds-x509`), nbdkit (`--tls-certificates`) and libnbd.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const SERVER_CERT_FILE: &str = "server-cert.pem";
pub const SERVER_KEY_FILE: &str = "server-key.pem";
pub const CLIENT_CERT_FILE: &str = "client-cert.pem";
pub const CLIENT_KEY_FILE: &str = "client-key.pem";

/// A CA plus a server certificate (and a client certificate for mutual TLS).
#[derive(Debug, Clone)]
pub struct TestPki {
    /// `ca-cert.pem`, `server-cert.pem`, `server-key.pem` (PKCS#8 "PRIVATE KEY").
    /// Pass it as qemu `tls-creds-x509,dir=`, `nbdkit --tls-certificates=`, and also as
    /// libnbd/nbdinfo `?tls-certificates=` (CA-only verification of the server).
    pub dir: PathBuf,
    pub ca_pem_path: PathBuf,
    pub server_cert_pem_path: PathBuf,
    pub server_key_pem_path: PathBuf,
    pub ca_cert_der: Vec<u8>,
    pub server_cert_der: Vec<u8>,
    /// PKCS#8 DER of the server key (ECDSA P-256).
    pub server_key_der: Vec<u8>,
    /// `dir/client`: `ca-cert.pem`, `client-cert.pem`, `client-key.pem` — libnbd
    /// `tls-certificates=` for servers that demand a client certificate (verify-peer on).
    pub client_dir: PathBuf,
    pub client_cert_der: Vec<u8>,
    pub client_key_der: Vec<u8>,
}

/// A single self-signed leaf (no CA), e.g. [`xapi_style_self_signed`].
#[derive(Debug, Clone)]
pub struct SelfSignedCert {
    /// Holds `cert.pem`, `key.pem`, `xapi-ssl.pem` (key followed by cert, like XAPI), and
    /// the same material as `ca-cert.pem` / `server-cert.pem` / `server-key.pem`, so that
    /// `NbdServer::nbdkit_tls_dir(.., Some(&dir), ..)` serves this certificate and libnbd
    /// `?tls-certificates=DIR` verifies against it. qemu-nbd rejects this directory
    /// (its ca-cert.pem has no basicConstraints CA:TRUE).
    pub dir: PathBuf,
    pub cert_pem_path: PathBuf,
    pub key_pem_path: PathBuf,
    /// Key and certificate concatenated in one file, as in `/etc/xensource/xapi-ssl.pem`.
    pub combined_pem_path: PathBuf,
    pub cert_der: Vec<u8>,
    /// PKCS#8 DER of the private key.
    pub key_der: Vec<u8>,
    /// True when the key is RSA-2048 (generated with the `openssl` CLI); false when openssl
    /// was not available and an ECDSA P-256 key was used instead.
    pub is_rsa: bool,
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "cbtstream test");
    dn.push(DnType::CommonName, cn);
    dn
}

fn localhost_sans() -> Result<Vec<SanType>> {
    Ok(vec![
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress("127.0.0.1".parse()?),
    ])
}

fn validity(params: &mut CertificateParams) {
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2099, 12, 31);
}

fn write_file(path: &Path, contents: &[u8]) -> Result<()> {
    fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

fn write_key(path: &Path, pem: &str) -> Result<()> {
    write_file(path, pem.as_bytes())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

impl TestPki {
    /// Generate a CA, a server leaf (DNS `localhost`, IP `127.0.0.1`) and a client leaf in
    /// `dir` (created if missing). All keys are ECDSA P-256 in PKCS#8 PEM, which GnuTLS
    /// (qemu-nbd, nbdkit, libnbd) and rustls all read.
    pub fn generate(dir: &Path) -> Result<TestPki> {
        let client_dir = dir.join("client");
        fs::create_dir_all(&client_dir)
            .with_context(|| format!("creating {}", client_dir.display()))?;

        // CA
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name = dn("cbtstream test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut ca_params);
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        // Server leaf
        let server_key = KeyPair::generate()?;
        let mut sp = CertificateParams::default();
        sp.distinguished_name = dn("localhost");
        sp.subject_alt_names = localhost_sans()?;
        sp.is_ca = IsCa::ExplicitNoCa;
        sp.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        sp.use_authority_key_identifier_extension = true;
        validity(&mut sp);
        let server_cert = sp.signed_by(&server_key, &issuer)?;

        // Client leaf (mutual TLS)
        let client_key = KeyPair::generate()?;
        let mut cp = CertificateParams::default();
        cp.distinguished_name = dn("cbtstream-test-client");
        cp.is_ca = IsCa::ExplicitNoCa;
        cp.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        cp.use_authority_key_identifier_extension = true;
        validity(&mut cp);
        let client_cert = cp.signed_by(&client_key, &issuer)?;

        let ca_pem_path = dir.join(CA_CERT_FILE);
        let server_cert_pem_path = dir.join(SERVER_CERT_FILE);
        let server_key_pem_path = dir.join(SERVER_KEY_FILE);
        write_file(&ca_pem_path, ca_cert.pem().as_bytes())?;
        write_file(&server_cert_pem_path, server_cert.pem().as_bytes())?;
        write_key(&server_key_pem_path, &server_key.serialize_pem())?;
        write_file(&client_dir.join(CA_CERT_FILE), ca_cert.pem().as_bytes())?;
        write_file(
            &client_dir.join(CLIENT_CERT_FILE),
            client_cert.pem().as_bytes(),
        )?;
        write_key(
            &client_dir.join(CLIENT_KEY_FILE),
            &client_key.serialize_pem(),
        )?;

        Ok(TestPki {
            dir: dir.to_path_buf(),
            ca_pem_path,
            server_cert_pem_path,
            server_key_pem_path,
            ca_cert_der: ca_cert.der().to_vec(),
            server_cert_der: server_cert.der().to_vec(),
            server_key_der: server_key.serialize_der(),
            client_dir,
            client_cert_der: client_cert.der().to_vec(),
            client_key_der: client_key.serialize_der(),
        })
    }

    /// rustls server config presenting the server leaf followed by the CA.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        rustls_server_config(
            vec![self.server_cert_der.clone(), self.ca_cert_der.clone()],
            self.server_key_der.clone(),
        )
    }

    /// rustls client config trusting the test CA (no client certificate).
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>> {
        rustls_client_config(std::slice::from_ref(&self.ca_cert_der))
    }
}

/// A self-signed RSA-2048 leaf for `localhost` / `127.0.0.1` with NO basicConstraints
/// extension, like the certificate XenServer generates for XAPI (and its NBD server).
///
/// rcgen cannot generate RSA keys with the ring backend (only aws-lc-rs can), so the key
/// is made with `openssl genpkey` (PKCS#8 PEM) and then loaded into rcgen for signing.
/// If `openssl` is not installed, falls back to ECDSA P-256 (`is_rsa == false`) with a
/// warning on stderr.
pub fn xapi_style_self_signed(dir: &Path) -> Result<SelfSignedCert> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key_pem_path = dir.join("key.pem");
    let cert_pem_path = dir.join("cert.pem");
    let combined_pem_path = dir.join("xapi-ssl.pem");

    let (key, is_rsa) = match openssl_rsa_2048(&key_pem_path) {
        Ok(pem) => (
            KeyPair::from_pem(&pem).context("loading the openssl RSA key into rcgen")?,
            true,
        ),
        Err(e) => {
            eprintln!(
                "cbtstream-testkit: WARNING: could not generate an RSA key with openssl ({e:#}); \
                 using ECDSA P-256 for the XAPI-style certificate instead"
            );
            (KeyPair::generate()?, false)
        }
    };

    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "localhost");
    params.distinguished_name = name;
    params.subject_alt_names = localhost_sans()?;
    params.is_ca = IsCa::NoCa; // no basicConstraints extension at all
    validity(&mut params);
    let cert = params.self_signed(&key)?;

    let key_pem = key.serialize_pem();
    let cert_pem = cert.pem();
    write_key(&key_pem_path, &key_pem)?;
    write_file(&cert_pem_path, cert_pem.as_bytes())?;
    write_key(&combined_pem_path, &format!("{key_pem}{cert_pem}"))?;
    // The GnuTLS directory layout too, with the certificate as its own "CA":
    // `nbdkit --tls-certificates=DIR` serves it and libnbd `tls-certificates=DIR` verifies
    // against it. (qemu-nbd refuses it: "ca-cert.pem is missing basic constraints for a CA".)
    write_file(&dir.join(CA_CERT_FILE), cert_pem.as_bytes())?;
    write_file(&dir.join(SERVER_CERT_FILE), cert_pem.as_bytes())?;
    write_key(&dir.join(SERVER_KEY_FILE), &key_pem)?;

    Ok(SelfSignedCert {
        dir: dir.to_path_buf(),
        cert_pem_path,
        key_pem_path,
        combined_pem_path,
        cert_der: cert.der().to_vec(),
        key_der: key.serialize_der(),
        is_rsa,
    })
}

impl SelfSignedCert {
    /// rustls server config presenting just this certificate.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        rustls_server_config(vec![self.cert_der.clone()], self.key_der.clone())
    }
}

fn openssl_rsa_2048(key_path: &Path) -> Result<String> {
    let out = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(key_path)
        .output()
        .context("running `openssl genpkey`")?;
    if !out.status.success() {
        bail!(
            "openssl genpkey failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let pem = fs::read_to_string(key_path)?;
    if !pem.contains("-----BEGIN PRIVATE KEY-----") {
        bail!("openssl did not write a PKCS#8 key");
    }
    Ok(pem)
}

fn ring_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls `ServerConfig` (ring provider, TLS 1.2 + 1.3, no client auth) for the given
/// certificate chain (DER, leaf first) and PKCS#8 DER private key.
pub fn rustls_server_config(
    cert_chain_der: Vec<Vec<u8>>,
    key_pkcs8_der: Vec<u8>,
) -> Result<Arc<rustls::ServerConfig>> {
    let chain: Vec<CertificateDer<'static>> = cert_chain_der
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8_der));
    let cfg = rustls::ServerConfig::builder_with_provider(ring_provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(Arc::new(cfg))
}

/// A rustls `ServerConfig` from PEM files (certificate chain file and private key file).
pub fn rustls_server_config_from_pem(
    cert_pem: &Path,
    key_pem: &Path,
) -> Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    let chain = CertificateDer::pem_file_iter(cert_pem)
        .with_context(|| format!("reading {}", cert_pem.display()))?
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key_pem)
        .with_context(|| format!("reading {}", key_pem.display()))?;
    let cfg = rustls::ServerConfig::builder_with_provider(ring_provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(Arc::new(cfg))
}

/// A rustls `ClientConfig` (ring provider) trusting exactly the given roots (DER).
pub fn rustls_client_config(roots_der: &[Vec<u8>]) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for der in roots_der {
        roots.add(CertificateDer::from(der.clone()))?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(ring_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// A self-signed ECDSA certificate (PEM) with subject CN `cn` and these subjectAltNames
/// (IP addresses where they parse as one, DNS names otherwise; none: no SAN extension), for
/// tests of name checks. Nothing is written to disk.
pub fn self_signed_pem(cn: &str, sans: &[&str]) -> Result<String> {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(cn);
    for san in sans {
        params.subject_alt_names.push(match san.parse() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName((*san).try_into()?),
        });
    }
    validity(&mut params);
    Ok(params.self_signed(&KeyPair::generate()?)?.pem())
}
