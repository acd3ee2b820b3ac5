//! `rollguard-agent enroll`: get this host's certificate with a one-time
//! token, the key generated here and never leaving the host.
//!
//! 1. `GET /v1/enroll/ca` on the controller's enrollment listener, over a
//!    TLS connection that trusts nothing yet ([`FetchOnly`]); the answer is
//!    believed only if the SHA-256 of the CA certificate's DER is the
//!    fingerprint the operator gave (`--ca-fingerprint`, printed by
//!    `rollguard-controller init`). Nothing secret is sent on it.
//! 2. A new connection that verifies the controller against that CA sends
//!    the token and a signing request for a key made here.
//! 3. The key (0600, never overwritten without `--force`), the certificate
//!    and the CA are written durably (temporary file, fsync, rename, fsync
//!    of the directory).
//!
//! Renewal ([`renew_files`]) reuses the key generation and the durable
//! writes; the daemon calls it.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use http_body_util::{BodyExt, Limited};
use hyper::Method;
use rollguard_shared::protocol::{EnrollRequest, EnrollResponse};
use rollguard_shared::tls_client::{self, Connector, ControllerUrls};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::Digest;

/// Largest answer read from the enrollment listener.
const MAX_ANSWER: usize = 64 * 1024;

/// A fingerprint as `SHA256:` and 64 hex digits (case and `:` separators
/// between bytes ignored); returns the 32 bytes.
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32]> {
    let hex_part = text
        .strip_prefix("SHA256:")
        .or_else(|| text.strip_prefix("sha256:"))
        .with_context(|| format!("--ca-fingerprint {text:?}: expected SHA256:<64 hex digits>"))?;
    let cleaned: String = hex_part.chars().filter(|c| *c != ':').collect();
    let bytes = hex::decode(&cleaned)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .with_context(|| format!("--ca-fingerprint {text:?}: expected SHA256:<64 hex digits>"))?;
    Ok(bytes)
}

/// The first certificate of a PEM text, DER.
fn first_cert(pem: &str) -> Option<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .and_then(|c| c.ok())
}

/// The CA certificate of the controller's answer, checked: the answer must
/// hold exactly one certificate (nothing else may ride along into the
/// trust store) and its SHA-256 must be `expected`. Returns it as DER.
pub fn checked_ca(ca_pem: &str, expected: &[u8; 32]) -> Result<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    let mut certs = CertificateDer::pem_slice_iter(ca_pem.as_bytes());
    let der = match (certs.next(), certs.next()) {
        (Some(Ok(der)), None) => der,
        (None, _) => bail!("the controller's CA answer is not a PEM certificate"),
        (Some(Err(e)), _) => bail!("the controller's CA answer is not a PEM certificate: {e}"),
        (Some(Ok(_)), Some(_)) => bail!(
            "the controller's CA answer holds more than one certificate: refusing to enroll \
             (only the one certificate the fingerprint names may be trusted)"
        ),
    };
    let got: [u8; 32] = sha2::Sha256::digest(der.as_ref()).into();
    if &got != expected {
        bail!(
            "the controller's CA certificate has fingerprint SHA256:{}, not the expected SHA256:{}: \
             refusing to enroll (wrong controller, wrong fingerprint, or someone in between)",
            hex::encode(got),
            hex::encode(expected)
        );
    }
    Ok(der)
}

/// A certificate as PEM text.
fn pem_of(der: &CertificateDer<'_>) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der.as_ref().to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// The server verifier of the one request made before the CA is known:
/// any certificate is accepted (the handshake signature is still checked),
/// so what the connection brings is only believed after the fingerprint
/// check. Never used for anything but `GET /v1/enroll/ca`.
#[derive(Debug)]
struct FetchOnly(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for FetchOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn fetch_only_config() -> Result<Arc<rustls::ClientConfig>> {
    let provider = tls_client::provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(FetchOnly(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn trusting_config(ca: &CertificateDer<'static>) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone())?;
    let mut config = rustls::ClientConfig::builder_with_provider(tls_client::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

async fn call(
    connector: &Connector,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<Vec<u8>> {
    let session = connector.connect().await?;
    let resp = session
        .request(method, path, body.map(|b| (b, "application/json")))
        .await?;
    let status = resp.status();
    let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading the controller's answer: {e}"))?
        .to_bytes()
        .to_vec();
    if !status.is_success() {
        let message = serde_json::from_slice::<rollguard_shared::protocol::ErrorBody>(&bytes)
            .map(|b| b.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).into());
        bail!("the controller answered {status}: {message}");
    }
    Ok(bytes)
}

/// A key generated here and a signing request for it.
pub struct NewKey {
    pub key_pem: String,
    pub csr_pem: String,
    /// Its public key, SubjectPublicKeyInfo DER.
    spki: Vec<u8>,
}

impl NewKey {
    /// A new key pair (ECDSA P-256, what the fleet's CA uses) and a signing
    /// request for it. The request's subject is only informative: the
    /// controller names the certificate.
    pub fn generate(name: &str) -> Result<Self> {
        let (key, csr) = key_and_csr(name)?;
        Ok(NewKey {
            spki: key.public_key_der(),
            key_pem: key.serialize_pem(),
            csr_pem: csr,
        })
    }

    /// Check that `cert_pem` certifies this key (a certificate for another
    /// key would replace working credentials with useless ones).
    pub fn check_cert(&self, cert_pem: &str) -> Result<()> {
        let der = first_cert(cert_pem).context("the answer holds no PEM certificate")?;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| anyhow::anyhow!("unparsable certificate: {e}"))?;
        if cert.public_key().raw != self.spki.as_slice() {
            bail!("the controller's certificate is not for the key generated here");
        }
        Ok(())
    }
}

fn key_and_csr(name: &str) -> Result<(rcgen::KeyPair, String)> {
    let key = rcgen::KeyPair::generate().context("generating the key")?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let csr = params
        .serialize_request(&key)
        .context("making the signing request")?
        .pem()?;
    Ok((key, csr))
}

/// What `enroll` was asked.
#[derive(Debug, Clone)]
pub struct EnrollOptions {
    pub url: String,
    pub ca_fingerprint: String,
    pub token: String,
    /// This host's name; the token must have been made for it.
    pub name: String,
    pub dir: PathBuf,
    pub force: bool,
}

/// What `enroll` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Enrolled {
    pub key: PathBuf,
    pub cert: PathBuf,
    pub ca: PathBuf,
}

/// Enroll this host; see the module documentation.
pub fn enroll(opts: &EnrollOptions) -> Result<Enrolled> {
    let expected = parse_fingerprint(&opts.ca_fingerprint)?;
    let urls = ControllerUrls::parse(&opts.url).map_err(|e| anyhow::anyhow!("--url: {e}"))?;
    fs::create_dir_all(&opts.dir).with_context(|| format!("creating {}", opts.dir.display()))?;
    let dir = opts
        .dir
        .canonicalize()
        .with_context(|| format!("{}", opts.dir.display()))?;
    let out = Enrolled {
        key: dir.join("agent.key"),
        cert: dir.join("agent.crt"),
        ca: dir.join("ca.crt"),
    };
    // Checked before the token is spent.
    if out.key.exists() && !opts.force {
        bail!(
            "{} already exists: refusing to replace this host's key (use --force)",
            out.key.display()
        );
    }
    let new_key = NewKey::generate(&opts.name)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let (ca_der, answer) = runtime.block_on(async {
        let fetch = Connector::new(urls.clone(), fetch_only_config()?);
        let ca = call(&fetch, Method::GET, "/v1/enroll/ca", None)
            .await
            .context("fetching the controller's CA")?;
        let ca = String::from_utf8(ca).context("the CA answer is not text")?;
        let ca = checked_ca(&ca, &expected)?;
        let trusted = Connector::new(urls, trusting_config(&ca)?);
        let body = serde_json::to_vec(&EnrollRequest {
            token: opts.token.trim().to_string(),
            name: opts.name.clone(),
            csr: new_key.csr_pem.clone(),
        })?;
        let answer = call(&trusted, Method::POST, "/v1/enroll", Some(body))
            .await
            .context("enrolling")?;
        let answer: EnrollResponse =
            serde_json::from_slice(&answer).context("the controller's answer")?;
        anyhow::Ok((ca, answer))
    })?;
    new_key.check_cert(&answer.cert)?;
    // The key first: a certificate without its key is useless, a key
    // without a certificate harmless.
    write_durably(&out.key, new_key.key_pem.as_bytes(), 0o600, !opts.force)?;
    write_durably(&out.cert, answer.cert.as_bytes(), 0o644, false)?;
    // The one certificate whose fingerprint was checked, encoded here (not
    // the answer's text).
    write_durably(&out.ca, pem_of(&ca_der).as_bytes(), 0o644, false)?;
    Ok(out)
}

/// Write `path` crash-safely: a temporary file beside it (created new,
/// `mode` from the start), fsync, then rename over `path` (or, with
/// `exclusive`, a hard link that fails if `path` exists), then fsync of the
/// directory.
pub fn write_durably(path: &Path, contents: &[u8], mode: u32, exclusive: bool) -> Result<()> {
    let tmp = tmp_path(path, "tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    if exclusive {
        let linked = fs::hard_link(&tmp, path);
        let _ = fs::remove_file(&tmp);
        linked.with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
    } else {
        fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    }
    sync_dir(path)
}

pub(crate) fn tmp_path(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(suffix);
    path.with_file_name(name)
}

pub(crate) fn sync_dir(path: &Path) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// The validity of the first certificate of `cert_pem`: (not before, not
/// after).
pub fn validity(cert_pem: &str) -> Result<(SystemTime, SystemTime)> {
    let der = first_cert(cert_pem).context("not a PEM certificate")?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| anyhow::anyhow!("unparsable certificate: {e}"))?;
    let at = |t: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    Ok((
        at(cert.validity().not_before.timestamp()),
        at(cert.validity().not_after.timestamp()),
    ))
}

/// When a certificate valid from `not_before` to `not_after` is renewed:
/// at two thirds of its lifetime.
pub fn renewal_due(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    not_before + life * 2 / 3
}

/// Finish a renewal a crash interrupted. [`install_renewed`] writes
/// `KEY.new` then `CERT.new` (each complete and synced; `CERT.new` exists
/// only once both are), then renames the key, then the certificate: so if
/// `CERT.new` exists both new files were complete and the renames are
/// finished here; a lone `KEY.new` is an unfinished renewal, dropped.
pub fn finish_renewal(cert: &Path, key: &Path) -> Result<()> {
    let _one = RENEWAL_FILES.lock().unwrap_or_else(|e| e.into_inner());
    finish_renewal_locked(cert, key)
}

/// Held by whoever touches the `.new` files: one install at a time (two
/// would share their names; a renewal task aborted with its session
/// leaves its install running), and no reload finishing or dropping them
/// while an install writes them.
static RENEWAL_FILES: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn finish_renewal_locked(cert: &Path, key: &Path) -> Result<()> {
    let (cert_new, key_new) = (tmp_path(cert, "new"), tmp_path(key, "new"));
    if cert_new.exists() {
        if key_new.exists() {
            fs::rename(&key_new, key).with_context(|| format!("renaming {}", key_new.display()))?;
            // The key's rename on disk before the certificate's: a power
            // loss must never keep a new certificate with the old key.
            sync_dir(key)?;
        }
        fs::rename(&cert_new, cert).with_context(|| format!("renaming {}", cert_new.display()))?;
        sync_dir(cert)?;
        tracing::info!(cert = %cert.display(), "finished an interrupted certificate renewal");
    } else if key_new.exists() {
        fs::remove_file(&key_new).with_context(|| format!("removing {}", key_new.display()))?;
    }
    Ok(())
}

/// Put a renewed key and certificate in place crash-safely (see
/// [`finish_renewal`]); the working ones stay until the new ones are
/// complete on disk.
pub fn install_renewed(cert: &Path, key: &Path, key_pem: &str, cert_pem: &str) -> Result<()> {
    let _one = RENEWAL_FILES.lock().unwrap_or_else(|e| e.into_inner());
    let (cert_new, key_new) = (tmp_path(cert, "new"), tmp_path(key, "new"));
    write_durably(&key_new, key_pem.as_bytes(), 0o600, false)?;
    write_durably(&cert_new, cert_pem.as_bytes(), 0o644, false)?;
    finish_renewal_locked(cert, key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_strictly() {
        let hex64 = "ab".repeat(32);
        assert_eq!(
            parse_fingerprint(&format!("SHA256:{hex64}")).unwrap(),
            [0xab; 32]
        );
        assert!(parse_fingerprint(&format!("SHA256:{}", hex64.to_uppercase())).is_ok());
        for bad in [
            hex64.clone(),
            format!("SHA1:{hex64}"),
            format!("SHA256:{}", &hex64[2..]),
            format!("SHA256:{hex64}00"),
            "SHA256:zz".into(),
        ] {
            assert!(parse_fingerprint(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_ca_with_another_fingerprint_is_refused() {
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let pem = ca.pem();
        let right: [u8; 32] = sha2::Sha256::digest(ca.der().as_ref()).into();
        let der = checked_ca(&pem, &right).unwrap();
        assert_eq!(der.as_ref(), ca.der().as_ref());
        // What is written back is that one certificate, re-encoded.
        assert_eq!(
            checked_ca(&pem_of(&der), &right).unwrap().as_ref(),
            der.as_ref()
        );
        let mut wrong = right;
        wrong[0] ^= 1;
        let e = checked_ca(&pem, &wrong).unwrap_err().to_string();
        assert!(e.contains("refusing to enroll"), "{e}");
        assert!(checked_ca("not a certificate", &right).is_err());
        // The right CA followed by another: refused, nothing may ride along
        // into the trust store.
        let other_key = rcgen::KeyPair::generate().unwrap();
        let other = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&other_key)
            .unwrap();
        let e = checked_ca(&format!("{pem}{}", other.pem()), &right)
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than one certificate"), "{e}");
    }

    #[test]
    fn the_key_is_written_private_and_never_replaced_unless_forced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("agent.key");
        write_durably(&key, b"one", 0o600, true).unwrap();
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(write_durably(&key, b"two", 0o600, true).is_err());
        assert_eq!(fs::read(&key).unwrap(), b"one");
        write_durably(&key, b"three", 0o600, false).unwrap();
        assert_eq!(fs::read(&key).unwrap(), b"three");
        assert!(!tmp_path(&key, "tmp").exists());
    }

    #[test]
    fn renewal_is_due_at_two_thirds_and_survives_a_crash() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(
            renewal_due(t0, t0 + Duration::from_secs(90)),
            t0 + Duration::from_secs(60)
        );
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("agent.crt"), dir.path().join("agent.key"));
        fs::write(&cert, "old cert").unwrap();
        fs::write(&key, "old key").unwrap();
        install_renewed(&cert, &key, "new key", "new cert").unwrap();
        assert_eq!(fs::read_to_string(&key).unwrap(), "new key");
        assert_eq!(fs::read_to_string(&cert).unwrap(), "new cert");
        // Crashed after the key's rename: the certificate's is finished.
        fs::write(tmp_path(&cert, "new"), "newer cert").unwrap();
        fs::write(&key, "newer key").unwrap();
        finish_renewal(&cert, &key).unwrap();
        assert_eq!(fs::read_to_string(&cert).unwrap(), "newer cert");
        // Crashed before the certificate was written: the old pair stays.
        fs::write(tmp_path(&key, "new"), "half").unwrap();
        finish_renewal(&cert, &key).unwrap();
        assert_eq!(fs::read_to_string(&key).unwrap(), "newer key");
        assert!(!tmp_path(&key, "new").exists());
    }
}
