//! The fleet's small certificate authority: `init`, `enroll`, `revoke`, and
//! how a verified peer certificate is turned into a [`Peer`] (who is calling,
//! in which role).
//!
//! Layout (one root, two issuing CAs, so a role is a matter of *which key
//! signed the certificate*, not of a field a client could choose):
//!
//! ```text
//! root CA  (ca/root.crt; signs the server cert and the two issuing CAs at init only)
//! ├── controller server cert (server.crt, EKU serverAuth, SANs localhost/127.0.0.1/::1/--san)
//! ├── agents issuing CA     (ca/agents-ca.crt,    pathlen 0) → agent certs    (CN = SAN = host name, EKU clientAuth)
//! └── operators issuing CA  (ca/operators-ca.crt, pathlen 0) → operator certs (OU = rollguard-operator)
//!                                                            → alert sources  (OU = rollguard-alert-source)
//! ```
//!
//! The controller's TLS client verifier trusts *only* the two issuing CAs
//! (not the root), and clients present just their leaf certificate; leaf
//! certificates are `CA:FALSE`, so a chain is always leaf → issuing CA. After
//! rustls has verified that chain, [`classify`] compares the leaf's issuer
//! name with the two issuing CAs' subject names (distinct by construction) to
//! decide the role, and checks the role marker (OU) as a second, independent
//! signal. An agent key therefore cannot mint or present an operator
//! certificate, and an operator certificate is never accepted on agent
//! endpoints. Revocation is a deny list of serial numbers (`revoked.list`),
//! checked on the handshake and again on every request.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use sha2::Digest;

/// Organisational unit marking an operator certificate (role
/// [`Role::Operator`]).
pub const OU_OPERATOR: &str = "rollguard-operator";
/// Organisational unit of a read-only operator certificate.
pub const OU_VIEWER: &str = "rollguard-viewer";
/// Organisational unit of an administrator's certificate.
pub const OU_ADMIN: &str = "rollguard-admin";
/// Organisational unit marking an alert-source certificate (may only post
/// alerts and read metrics).
pub const OU_ALERT_SOURCE: &str = "rollguard-alert-source";
/// Organisational unit of agent certificates.
pub const OU_AGENT: &str = "rollguard-agent";
const ORG: &str = "rollguard";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{0} already exists: refusing to overwrite an existing CA (use another --dir)")]
    Exists(PathBuf),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0}: not a PEM certificate")]
    BadPem(PathBuf),
    #[error(
        "{0:?} is not a valid host name for a certificate: use letters, digits, '-', '.' and '_'"
    )]
    BadName(String),
    #[error("no certificate was issued to {0:?} (looked in {1})")]
    UnknownHost(String, PathBuf),
    #[error("certificate signing request refused: {0}")]
    BadCsr(String),
    #[error("{0} is not the key of the agents CA certificate {1}")]
    KeyMismatch(PathBuf, PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        error: source,
    }
}

/// What a certificate is for. People (and their scripts) hold one of
/// three roles, each able to do what the one before it may, and more:
///
/// | role | may |
/// |---|---|
/// | viewer | read: rollouts, agents, the kill state, bundles, metrics |
/// | operator | plan, upload, start, halt, resume; kill |
/// | admin | everything an operator may, and lift kills |
///
/// Enrolling and revoking are done with the CA directory itself
/// (`rollguard-controller enroll/revoke --dir`), which only its keeper can
/// read. The three are issued by the operators' CA, told apart by their
/// organisational unit; an agent's certificate by the agents' CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Agent,
    Viewer,
    Operator,
    Admin,
    AlertSource,
}

impl Role {
    /// Its name in messages and the operator log.
    pub fn name(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::AlertSource => "alert-source",
        }
    }
}

/// The caller of a request, as proven by its verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub role: Role,
    /// The certificate's common name: the host name for agents.
    pub name: String,
    /// Serial number, lowercase hex (the revocation key).
    pub serial: String,
    /// When the certificate expires, Unix milliseconds.
    pub not_after: i64,
}

/// The files of a CA directory.
#[derive(Debug, Clone)]
pub struct CaDir {
    pub dir: PathBuf,
}

impl CaDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        CaDir { dir: dir.into() }
    }
    pub fn root_cert(&self) -> PathBuf {
        self.dir.join("ca/root.crt")
    }
    fn root_key(&self) -> PathBuf {
        self.dir.join("ca/root.key")
    }
    pub fn agents_ca_cert(&self) -> PathBuf {
        self.dir.join("ca/agents-ca.crt")
    }
    fn agents_ca_key(&self) -> PathBuf {
        self.dir.join("ca/agents-ca.key")
    }
    pub fn operators_ca_cert(&self) -> PathBuf {
        self.dir.join("ca/operators-ca.crt")
    }
    fn operators_ca_key(&self) -> PathBuf {
        self.dir.join("ca/operators-ca.key")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.crt")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    pub fn operator_cert(&self) -> PathBuf {
        self.dir.join("operator.crt")
    }
    pub fn operator_key(&self) -> PathBuf {
        self.dir.join("operator.key")
    }
    pub fn revoked_list(&self) -> PathBuf {
        self.dir.join("revoked.list")
    }
    pub fn issued_dir(&self) -> PathBuf {
        self.dir.join("issued")
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("controller.toml")
    }
}

fn ca_params(cn: &str, pathlen: u8) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORG);
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(pathlen));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    p
}

const ROOT_CN: &str = "rollguard root CA";
const AGENTS_CN: &str = "rollguard agents CA";
const OPERATORS_CN: &str = "rollguard operators CA";

/// Serial numbers derive from the subject key (unique per issued key) so
/// that no random source is needed and a serial names one key.
fn serial_for(key: &KeyPair) -> SerialNumber {
    serial_for_spki(&key.public_key_der())
}

/// [`serial_for`] of a public key given as its SubjectPublicKeyInfo DER.
fn serial_for_spki(spki_der: &[u8]) -> SerialNumber {
    let digest = sha2::Sha256::digest(spki_der);
    let mut bytes = digest[..16].to_vec();
    bytes[0] &= 0x7f; // positive INTEGER
    bytes[0] |= 0x01; // no leading zero byte to strip
    SerialNumber::from_slice(&bytes)
}

fn leaf_validity(p: &mut CertificateParams, days: i64) {
    let today = jiff::Zoned::now().date();
    let start = today
        .checked_sub(jiff::Span::new().days(1))
        .unwrap_or(today);
    let end = today
        .checked_add(jiff::Span::new().days(days))
        .unwrap_or(today);
    p.not_before =
        rcgen::date_time_ymd(start.year() as i32, start.month() as u8, start.day() as u8);
    p.not_after = rcgen::date_time_ymd(end.year() as i32, end.month() as u8, end.day() as u8);
}

/// A loaded issuing CA. rcgen signs with the issuer's name, key-identifier
/// method and key, so re-deriving the same parameters and self-signing them
/// with the stored key gives an issuer identical to the one on disk (this
/// avoids parsing the CA certificate back, which would pull a second crypto
/// library into the build).
struct Issuer {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Issuer {
    fn load(key_path: &Path, cn: &str, pathlen: u8) -> Result<Self, PkiError> {
        let pem = fs::read_to_string(key_path).map_err(io(key_path))?;
        let key = KeyPair::from_pem(&pem)?;
        let cert = ca_params(cn, pathlen).self_signed(&key)?;
        Ok(Issuer { cert, key })
    }
}

/// Write `path` whole or not at all, with `mode`. The contents go to a file
/// of a fresh random name beside it, created exclusively (`O_EXCL`: never a
/// file or symlink planted there beforehand, as in a shared `--out /tmp/x`,
/// which a fixed name like `NAME.tmp` allowed), synced, then renamed over
/// `path` (a symlink at `path` is replaced, not followed).
fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::create_dir_all(parent).map_err(io(parent))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".rollguard-")
        .suffix(".tmp")
        .permissions(fs::Permissions::from_mode(mode))
        .tempfile_in(parent)
        .map_err(io(parent))?;
    let at = tmp.path().to_path_buf();
    tmp.write_all(contents.as_bytes()).map_err(io(&at))?;
    // On the descriptor (the umask may have narrowed the mode asked for).
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io(&at))?;
    tmp.as_file().sync_all().map_err(io(&at))?;
    tmp.persist(path).map_err(|e| PkiError::Io {
        path: path.to_path_buf(),
        error: e.error,
    })?;
    Ok(())
}

/// Options of `rollguard-controller init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Extra DNS names or IP addresses of the controller.
    pub extra_sans: Vec<String>,
    /// Address the server will listen on (written into controller.toml).
    pub listen: String,
    /// Name of the first operator certificate.
    pub operator_name: String,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            extra_sans: vec![],
            listen: "127.0.0.1:8443".into(),
            operator_name: "admin".into(),
        }
    }
}

/// Create the CA hierarchy, the server certificate, the first operator
/// certificate and a commented `controller.toml`.
pub fn init(ca: &CaDir, opts: &InitOptions) -> Result<(), PkiError> {
    if ca.root_cert().exists() || ca.config().exists() {
        return Err(PkiError::Exists(ca.root_cert()));
    }
    fs::create_dir_all(ca.dir.join("ca")).map_err(io(&ca.dir))?;
    fs::set_permissions(ca.dir.join("ca"), fs::Permissions::from_mode(0o700))
        .map_err(io(&ca.dir))?;

    let root_key = KeyPair::generate()?;
    let root = ca_params(ROOT_CN, 1).self_signed(&root_key)?;
    let agents_key = KeyPair::generate()?;
    let agents = ca_params(AGENTS_CN, 0).signed_by(&agents_key, &root, &root_key)?;
    let operators_key = KeyPair::generate()?;
    let operators = ca_params(OPERATORS_CN, 0).signed_by(&operators_key, &root, &root_key)?;

    let mut sans: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    sans.extend(opts.extra_sans.iter().cloned());
    let mut server = CertificateParams::new(sans)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORG);
    dn.push(DnType::CommonName, "rollguard controller");
    server.distinguished_name = dn;
    server.is_ca = IsCa::ExplicitNoCa;
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf_validity(&mut server, 3650);
    let server_key = KeyPair::generate()?;
    server.serial_number = Some(serial_for(&server_key));
    let server = server.signed_by(&server_key, &root, &root_key)?;

    write_file(&ca.root_key(), &root_key.serialize_pem(), 0o600)?;
    write_file(&ca.root_cert(), &root.pem(), 0o644)?;
    write_file(&ca.agents_ca_key(), &agents_key.serialize_pem(), 0o600)?;
    write_file(&ca.agents_ca_cert(), &agents.pem(), 0o644)?;
    write_file(
        &ca.operators_ca_key(),
        &operators_key.serialize_pem(),
        0o600,
    )?;
    write_file(&ca.operators_ca_cert(), &operators.pem(), 0o644)?;
    write_file(&ca.server_key(), &server_key.serialize_pem(), 0o600)?;
    write_file(&ca.server_cert(), &server.pem(), 0o644)?;
    write_file(&ca.dir.join("ca.crt"), &root.pem(), 0o644)?;
    write_file(&ca.revoked_list(), REVOKED_HEADER, 0o644)?;

    // Whoever sets the controller up is its first administrator.
    let (cert, key) = issue(ca, Role::Admin, &opts.operator_name)?;
    write_file(&ca.operator_cert(), &cert, 0o644)?;
    write_file(&ca.operator_key(), &key, 0o600)?;
    write_file(
        &ca.config(),
        &crate::config::ControllerConfig::commented_template(&opts.listen),
        0o644,
    )?;
    Ok(())
}

const REVOKED_HEADER: &str = "# Revoked certificate serial numbers (hex), one per line, then the name.\n# Written by `rollguard-controller revoke`; read by the running controller.\n";

/// Whether `name` may be a certificate's name (CN; an agent's SAN).
pub fn valid_cert_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && !name.starts_with(['-', '.'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
}

/// What the controller puts in a client certificate for `name` (everything
/// but the key, the validity and the serial): the same for a key generated
/// here ([`issue`]) and for one only the host holds ([`AgentSigner`]).
fn client_params(agent: bool, ou: &str, name: &str) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORG);
    dn.push(DnType::OrganizationalUnitName, ou);
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    if agent {
        p.subject_alt_names = vec![SanType::DnsName(name.try_into()?)];
    }
    p.is_ca = IsCa::ExplicitNoCa;
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

/// An agent certificate issued for a signing request.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    /// Lowercase hex, as [`Peer::serial`].
    pub serial: String,
    /// Unix milliseconds.
    pub not_after: i64,
}

/// The agents' issuing CA, loaded by a serving controller from
/// `[enrollment] agents_ca_key`, to sign agents' certificate signing
/// requests (enrollment and renewal).
pub struct AgentSigner {
    issuer: Issuer,
}

/// Accepted certificate signing requests are at most this long (PEM).
pub const MAX_CSR_BYTES: usize = 16 * 1024;

impl AgentSigner {
    pub fn load(agents_ca_key: &Path) -> Result<Self, PkiError> {
        Ok(AgentSigner {
            issuer: Issuer::load(agents_ca_key, AGENTS_CN, 0)?,
        })
    }

    /// [`AgentSigner::load`], refusing a key that is not the one of the
    /// agents CA certificate the server trusts (`[tls] agents_ca`): what it
    /// signed would never be accepted.
    pub fn load_matching(agents_ca_key: &Path, agents_ca_cert: &Path) -> Result<Self, PkiError> {
        let signer = Self::load(agents_ca_key)?;
        let der = crate::tls::load_certs(agents_ca_cert)
            .ok()
            .and_then(|c| c.into_iter().next())
            .ok_or_else(|| PkiError::BadPem(agents_ca_cert.to_path_buf()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|_| PkiError::BadPem(agents_ca_cert.to_path_buf()))?;
        if cert.public_key().raw != signer.issuer.key.public_key_der().as_slice() {
            return Err(PkiError::KeyMismatch(
                agents_ca_key.to_path_buf(),
                agents_ca_cert.to_path_buf(),
            ));
        }
        Ok(signer)
    }

    /// Sign an agent certificate for `name`, valid from just before now for
    /// `lifetime`, for the public key of a verified request. Nothing else
    /// of the request is used: its subject, names and extensions are
    /// ignored, the certificate's are the controller's.
    pub fn sign(
        &self,
        name: &str,
        csr: &Csr,
        lifetime: std::time::Duration,
    ) -> Result<Issued, PkiError> {
        if !valid_cert_name(name) {
            return Err(PkiError::BadName(name.to_string()));
        }
        let mut p = client_params(true, OU_AGENT, name)?;
        let now = std::time::SystemTime::now();
        let end = now + lifetime;
        // A little before now for clocks slightly behind; a tenth of the
        // lifetime at most, so that a short lifetime (tests) still renews
        // at about two thirds of what was configured.
        let back = (lifetime / 10).min(std::time::Duration::from_secs(60));
        p.not_before = (now - back).into();
        p.not_after = end.into();
        let serial = serial_for_spki(&csr.spki);
        p.serial_number = Some(serial.clone());
        let cert = p.signed_by(&csr.params.public_key, &self.issuer.cert, &self.issuer.key)?;
        let not_after = end
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| {
                i64::try_from(d.as_secs())
                    .unwrap_or(i64::MAX)
                    .saturating_mul(1000)
            })
            .unwrap_or(0);
        Ok(Issued {
            cert_pem: cert.pem(),
            serial: hex::encode(serial.to_bytes()),
            not_after,
        })
    }
}

/// A certificate signing request whose self-signature verified: its sender
/// holds the private key of [`Csr::spki`].
pub struct Csr {
    params: rcgen::CertificateSigningRequestParams,
    /// The public key, SubjectPublicKeyInfo DER.
    spki: Vec<u8>,
}

impl Csr {
    /// Parse a PEM `CERTIFICATE REQUEST` and verify its signature.
    pub fn parse(csr_pem: &str) -> Result<Self, PkiError> {
        if csr_pem.len() > MAX_CSR_BYTES {
            return Err(PkiError::BadCsr("too long".into()));
        }
        let der = csr_der(csr_pem)
            .ok_or_else(|| PkiError::BadCsr("not a PEM CERTIFICATE REQUEST".into()))?;
        Self::from_der(&der)
    }

    /// [`Csr::parse`] of DER.
    pub fn from_der(der: &[u8]) -> Result<Self, PkiError> {
        if der.len() > MAX_CSR_BYTES {
            return Err(PkiError::BadCsr("too long".into()));
        }
        // rcgen verifies the request's signature (x509-parser's `verify`)
        // before it returns anything.
        let params = rcgen::CertificateSigningRequestParams::from_der(&der.into())
            .map_err(|e| PkiError::BadCsr(format!("unparsable or badly signed ({e})")))?;
        use x509_parser::prelude::FromDer;
        let (_, req) = x509_parser::certification_request::X509CertificationRequest::from_der(der)
            .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        let spki = req.certification_request_info.subject_pki.raw.to_vec();
        Ok(Csr { params, spki })
    }
}

/// The DER of a PEM `CERTIFICATE REQUEST`.
fn csr_der(text: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(text.as_bytes())
        .ok()
        .map(|d| d.as_ref().to_vec())
}

/// The SHA-256 fingerprint of the first certificate of a PEM file, as
/// `SHA256:` and lowercase hex (what `rollguard-agent enroll
/// --ca-fingerprint` checks).
pub fn fingerprint_of_pem(path: &Path) -> Result<String, PkiError> {
    let der = crate::tls::load_certs(path)
        .ok()
        .and_then(|c| c.into_iter().next())
        .ok_or_else(|| PkiError::BadPem(path.to_path_buf()))?;
    Ok(format!(
        "SHA256:{}",
        hex::encode(sha2::Sha256::digest(der.as_ref()))
    ))
}

/// Issue a certificate for `name` in `role`; returns (cert PEM, key PEM) and
/// records the certificate under `issued/` so it can be revoked by name.
pub fn issue(ca: &CaDir, role: Role, name: &str) -> Result<(String, String), PkiError> {
    if !valid_cert_name(name) {
        return Err(PkiError::BadName(name.to_string()));
    }
    let (issuer, ou, eku_days) = match role {
        Role::Agent => (
            Issuer::load(&ca.agents_ca_key(), AGENTS_CN, 0)?,
            OU_AGENT,
            825,
        ),
        Role::Viewer | Role::Operator | Role::Admin => (
            Issuer::load(&ca.operators_ca_key(), OPERATORS_CN, 0)?,
            match role {
                Role::Viewer => OU_VIEWER,
                Role::Admin => OU_ADMIN,
                _ => OU_OPERATOR,
            },
            825,
        ),
        Role::AlertSource => (
            Issuer::load(&ca.operators_ca_key(), OPERATORS_CN, 0)?,
            OU_ALERT_SOURCE,
            825,
        ),
    };
    let mut p = client_params(role == Role::Agent, ou, name)?;
    leaf_validity(&mut p, eku_days);
    let key = KeyPair::generate()?;
    p.serial_number = Some(serial_for(&key));
    let cert = p.signed_by(&key, &issuer.cert, &issuer.key)?;
    let role_dir = match role {
        Role::Agent => "agents",
        Role::Viewer | Role::Operator | Role::Admin => "operators",
        Role::AlertSource => "alert-sources",
    };
    let serial = hex::encode(serial_for(&key).to_bytes());
    write_file(
        &ca.issued_dir()
            .join(role_dir)
            .join(format!("{name}.{serial}.crt")),
        &cert.pem(),
        0o644,
    )?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Write an issued certificate and key as `OUT/NAME.crt` and `OUT/NAME.key`.
pub fn issue_to(
    ca: &CaDir,
    role: Role,
    name: &str,
    out: &Path,
) -> Result<(PathBuf, PathBuf), PkiError> {
    let (cert, key) = issue(ca, role, name)?;
    let cert_path = out.join(format!("{name}.crt"));
    let key_path = out.join(format!("{name}.key"));
    write_file(&cert_path, &cert, 0o644)?;
    write_file(&key_path, &key, 0o600)?;
    Ok((cert_path, key_path))
}

/// Revoke every certificate issued to `name` (any role): their serials are
/// appended to `revoked.list`, which the running controller re-reads.
/// Returns the revoked serials.
pub fn revoke(ca: &CaDir, name: &str) -> Result<Vec<String>, PkiError> {
    if !valid_cert_name(name) {
        return Err(PkiError::BadName(name.to_string()));
    }
    let mut serials = Vec::new();
    for role_dir in ["agents", "operators", "alert-sources"] {
        let dir = ca.issued_dir().join(role_dir);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(PkiError::Io {
                    path: dir,
                    error: e,
                })
            }
        };
        for entry in entries {
            let entry = entry.map_err(io(&dir))?;
            let file = entry.file_name().to_string_lossy().into_owned();
            // Exactly `NAME.<hex serial>.crt`: names may hold dots, and
            // `web.example.com.<serial>.crt` is not one of `web`'s.
            let serial = file
                .strip_prefix(&format!("{name}."))
                .and_then(|rest| rest.strip_suffix(".crt"))
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit()));
            if let Some(serial) = serial {
                serials.push(serial.to_string());
            }
        }
    }
    if serials.is_empty() {
        return Err(PkiError::UnknownHost(name.to_string(), ca.issued_dir()));
    }
    let path = ca.revoked_list();
    // One revoker at a time: two reading the same list and each writing it
    // back with only its own serials would lose the other's. The lock is
    // on the CA directory itself: no lock file, whose owner (root, once)
    // could keep the service user from revoking later.
    let ca_dir = fs::File::open(&ca.dir).map_err(io(&ca.dir))?;
    let _lock = nix::fcntl::Flock::lock(ca_dir, nix::fcntl::FlockArg::LockExclusive).map_err(
        |(_, e)| PkiError::Io {
            path: ca.dir.clone(),
            error: e.into(),
        },
    )?;
    // Only a missing list starts afresh: a list that cannot be read (EIO, a
    // hand edit that is not UTF-8) written back with the new serials alone
    // would un-revoke every earlier one.
    let mut text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => REVOKED_HEADER.to_string(),
        Err(e) => return Err(PkiError::Io { path, error: e }),
    };
    if !text.ends_with('\n') {
        text.push('\n');
    }
    let already = RevocationList::parse(&text);
    for s in &serials {
        if !already.serials.contains_key(s) {
            text.push_str(&format!("{s} {name}\n"));
        }
    }
    write_file(&path, &text, 0o644)?;
    Ok(serials)
}

/// The parsed deny list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationList {
    /// serial (hex) → name
    pub serials: BTreeMap<String, String>,
}

impl RevocationList {
    pub fn parse(text: &str) -> Self {
        let mut serials = BTreeMap::new();
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let mut parts = line.split_whitespace();
            if let Some(serial) = parts.next() {
                let name = parts.next().unwrap_or("").to_string();
                serials.insert(serial.to_ascii_lowercase(), name);
            }
        }
        RevocationList { serials }
    }
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.serials.contains_key(serial)
    }
}

/// The subject names of the two issuing CAs, for [`classify`].
#[derive(Debug, Clone)]
pub struct Issuers {
    agents_subject: Vec<u8>,
    operators_subject: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerError {
    #[error("no client certificate")]
    NoCertificate,
    #[error("client certificate cannot be parsed")]
    Unparsable,
    #[error("client certificate was not issued by the agents or operators CA")]
    UnknownIssuer,
    #[error("client certificate has no usable common name")]
    NoName,
    #[error("client certificate's role marker (OU) does not match its issuer")]
    RoleMismatch,
}

impl Issuers {
    pub fn from_pem_files(agents_ca: &Path, operators_ca: &Path) -> Result<Self, PkiError> {
        Ok(Issuers {
            agents_subject: subject_of_pem(agents_ca)?,
            operators_subject: subject_of_pem(operators_ca)?,
        })
    }
}

fn subject_of_pem(path: &Path) -> Result<Vec<u8>, PkiError> {
    let der = crate::tls::load_certs(path)
        .ok()
        .and_then(|c| c.into_iter().next())
        .ok_or_else(|| PkiError::BadPem(path.to_path_buf()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|_| PkiError::BadPem(path.to_path_buf()))?;
    Ok(cert.subject().as_raw().to_vec())
}

/// Decide who a *verified* leaf certificate belongs to.
pub fn classify(issuers: &Issuers, leaf_der: &[u8]) -> Result<Peer, PeerError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf_der).map_err(|_| PeerError::Unparsable)?;
    let issuer = cert.issuer().as_raw();
    let ou: Vec<&str> = cert
        .subject()
        .iter_organizational_unit()
        .filter_map(|a| a.as_str().ok())
        .collect();
    let role = if issuer == issuers.agents_subject.as_slice() {
        if ou != [OU_AGENT] {
            return Err(PeerError::RoleMismatch);
        }
        Role::Agent
    } else if issuer == issuers.operators_subject.as_slice() {
        match ou.as_slice() {
            [o] if *o == OU_VIEWER => Role::Viewer,
            [o] if *o == OU_OPERATOR => Role::Operator,
            [o] if *o == OU_ADMIN => Role::Admin,
            [o] if *o == OU_ALERT_SOURCE => Role::AlertSource,
            _ => return Err(PeerError::RoleMismatch),
        }
    } else {
        return Err(PeerError::UnknownIssuer);
    };
    let mut cns = cert.subject().iter_common_name();
    let name = cns
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or(PeerError::NoName)?
        .to_string();
    if cns.next().is_some() || !valid_cert_name(&name) {
        return Err(PeerError::NoName);
    }
    Ok(Peer {
        role,
        name,
        serial: hex::encode(cert.raw_serial()),
        not_after: cert.validity().not_after.timestamp().saturating_mul(1000),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der_of(pem: &str) -> Vec<u8> {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec()
    }

    #[test]
    fn roles_follow_the_issuing_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CaDir::new(dir.path());
        init(&ca, &InitOptions::default()).unwrap();
        assert!(matches!(
            init(&ca, &InitOptions::default()),
            Err(PkiError::Exists(_))
        ));
        let issuers =
            Issuers::from_pem_files(&ca.agents_ca_cert(), &ca.operators_ca_cert()).unwrap();

        let (agent, _) = issue(&ca, Role::Agent, "mail-01").unwrap();
        let peer = classify(&issuers, &der_of(&agent)).unwrap();
        assert_eq!((peer.role, peer.name.as_str()), (Role::Agent, "mail-01"));

        // The certificate `init` issues is the first administrator's.
        let op = fs::read_to_string(ca.operator_cert()).unwrap();
        let peer = classify(&issuers, &der_of(&op)).unwrap();
        assert_eq!((peer.role, peer.name.as_str()), (Role::Admin, "admin"));
        for role in [Role::Viewer, Role::Operator, Role::Admin] {
            let (cert, _) = issue(&ca, role, "someone").unwrap();
            let peer = classify(&issuers, &der_of(&cert)).unwrap();
            assert_eq!(peer.role, role);
        }

        let (alerts, _) = issue(&ca, Role::AlertSource, "alertmanager").unwrap();
        assert_eq!(
            classify(&issuers, &der_of(&alerts)).unwrap().role,
            Role::AlertSource
        );

        // The server certificate is signed by the root, which is not a client issuer.
        let server = fs::read_to_string(ca.server_cert()).unwrap();
        assert_eq!(
            classify(&issuers, &der_of(&server)),
            Err(PeerError::UnknownIssuer)
        );
        assert_eq!(classify(&issuers, b"garbage"), Err(PeerError::Unparsable));
        assert!(matches!(
            issue(&ca, Role::Agent, "../x"),
            Err(PkiError::BadName(_))
        ));
    }

    #[test]
    fn revoke_lists_every_serial_of_a_name() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CaDir::new(dir.path());
        init(&ca, &InitOptions::default()).unwrap();
        let issuers =
            Issuers::from_pem_files(&ca.agents_ca_cert(), &ca.operators_ca_cert()).unwrap();
        let (c1, _) = issue(&ca, Role::Agent, "web-1").unwrap();
        let (c2, _) = issue(&ca, Role::Agent, "web-2").unwrap();
        let s1 = classify(&issuers, &der_of(&c1)).unwrap().serial;
        let s2 = classify(&issuers, &der_of(&c2)).unwrap().serial;
        assert_ne!(s1, s2);
        assert_eq!(revoke(&ca, "web-1").unwrap(), vec![s1.clone()]);
        revoke(&ca, "web-1").unwrap(); // idempotent
        let list = RevocationList::parse(&fs::read_to_string(ca.revoked_list()).unwrap());
        assert!(list.is_revoked(&s1));
        assert!(!list.is_revoked(&s2));
        assert_eq!(list.serials.len(), 1);
        assert!(matches!(
            revoke(&ca, "nobody"),
            Err(PkiError::UnknownHost(..))
        ));
    }

    /// `web` is not `web.example.com`; a list that cannot be read is an
    /// error, not a fresh start that would un-revoke what it held.
    #[test]
    fn revoke_takes_only_the_name_and_never_forgets_the_list() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CaDir::new(dir.path());
        init(&ca, &InitOptions::default()).unwrap();
        issue(&ca, Role::Agent, "web.example.com").unwrap();
        assert!(matches!(revoke(&ca, "web"), Err(PkiError::UnknownHost(..))));
        issue(&ca, Role::Agent, "web").unwrap();
        assert_eq!(revoke(&ca, "web").unwrap().len(), 1);
        let before = fs::read(ca.revoked_list()).unwrap();
        fs::write(ca.revoked_list(), [&before[..], b"\xff\n"].concat()).unwrap();
        assert!(matches!(
            revoke(&ca, "web.example.com"),
            Err(PkiError::Io { .. })
        ));
    }

    /// A file or symlink planted under the name a certificate or key used
    /// to be staged at (`NAME.tmp`, in a shared `--out` directory) is never
    /// written through; a symlink at the destination is replaced.
    #[test]
    fn issued_files_are_never_written_through_a_planted_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CaDir::new(dir.path().join("ca"));
        init(&ca, &InitOptions::default()).unwrap();
        let out = dir.path().join("out");
        fs::create_dir(&out).unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, out.join("alice.tmp")).unwrap();
        std::os::unix::fs::symlink(&victim, out.join("alice.key")).unwrap();
        let (_, key) = issue_to(&ca, Role::Admin, "alice", &out).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        let meta = fs::symlink_metadata(&key).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(fs::read_to_string(&key).unwrap().contains("PRIVATE KEY"));
    }

    fn csr_for(key: &KeyPair, cn: &str, ou: &str) -> String {
        let mut p = CertificateParams::new(vec!["admin".to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.distinguished_name
            .push(DnType::OrganizationalUnitName, ou);
        p.serialize_request(key).unwrap().pem().unwrap()
    }

    #[test]
    fn a_signing_request_gives_only_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CaDir::new(dir.path());
        init(&ca, &InitOptions::default()).unwrap();
        let issuers =
            Issuers::from_pem_files(&ca.agents_ca_cert(), &ca.operators_ca_cert()).unwrap();
        let signer = AgentSigner::load(&ca.agents_ca_key()).unwrap();
        let key = KeyPair::generate().unwrap();
        // It asks to be an administrator named "admin": it gets an agent
        // certificate for the name the controller chose.
        let csr = Csr::parse(&csr_for(&key, "admin", OU_ADMIN)).unwrap();
        let before = jiff::Timestamp::now().as_millisecond();
        let issued = signer
            .sign("web-1", &csr, std::time::Duration::from_secs(30))
            .unwrap();
        let der = der_of(&issued.cert_pem);
        let peer = classify(&issuers, &der).unwrap();
        assert_eq!((peer.role, peer.name.as_str()), (Role::Agent, "web-1"));
        assert_eq!(peer.serial, issued.serial);
        assert_eq!(peer.not_after, issued.not_after);
        assert!((before + 29_000..=before + 32_000).contains(&issued.not_after));
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(cert.public_key().raw, key.public_key_der().as_slice());
        let sans: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(sans, vec!["DNSName(web-1)".to_string()]);
        // Seconds-precise validity starting just before now.
        let nb = cert.validity().not_before.timestamp() * 1000;
        assert!((before - 4_000..=before).contains(&nb), "{nb} {before}");
        // The serial derives from the key, as for centrally made keys.
        assert_eq!(issued.serial, hex::encode(serial_for(&key).to_bytes()));
        assert!(matches!(
            signer.sign("../x", &csr, std::time::Duration::from_secs(30)),
            Err(PkiError::BadName(_))
        ));
    }

    #[test]
    fn a_badly_signed_request_is_refused() {
        use rustls::pki_types::pem::PemObject;
        let key = KeyPair::generate().unwrap();
        let pem = csr_for(&key, "web-1", OU_AGENT);
        let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        assert!(Csr::from_der(&der).is_ok());
        // The last byte is the signature's.
        let mut bad = der.clone();
        *bad.last_mut().unwrap() ^= 0x01;
        assert!(matches!(Csr::from_der(&bad), Err(PkiError::BadCsr(_))));
        // A subject changed after signing.
        let at = der
            .windows(5)
            .position(|w| w == b"web-1")
            .expect("subject in the DER");
        let mut bad = der.clone();
        bad[at] = b'x';
        assert!(matches!(Csr::from_der(&bad), Err(PkiError::BadCsr(_))));
        assert!(matches!(Csr::parse("garbage"), Err(PkiError::BadCsr(_))));
    }
}
