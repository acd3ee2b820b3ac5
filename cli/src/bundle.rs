//! `rollguard bundle ...`: build, sign, verify and inspect bundles.
//!
//! Everything here works on local files; nothing talks to the controller.
//! `inspect` is what a reviewer reads before signing, so it puts the blast
//! radius (targets, scopes, command) first and flags anything broad.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use rollguard_shared::archive::{self, BuildOptions, Limits, OpenedBundle, StoredSignature};
use rollguard_shared::exit::Exit;
use rollguard_shared::manifest::{EndpointHost, Manifest, SKELETON};
use rollguard_shared::signature::{self, AllowedSigners, RawSignature, VerifyError};
use serde_json::json;
use sha2::{Digest, Sha256};

/// Bundle subcommands.
#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Write a commented bundle skeleton (bundle.toml + apply.sh) into DIR.
    Init {
        /// New or empty directory.
        dir: PathBuf,
    },
    /// Build a bundle file from a source directory (bundle.toml + payload).
    Build {
        /// Directory holding bundle.toml and the files to ship.
        src: PathBuf,
        /// The bundle file to write.
        #[arg(short, long)]
        output: PathBuf,
        /// zstd-compress the bundle.
        #[arg(long)]
        zstd: bool,
        #[arg(long)]
        json: bool,
    },
    /// Print the exact manifest bytes that signatures cover (for `ssh-keygen -Y sign`).
    Manifest { bundle: PathBuf },
    /// Sign a bundle with an OpenSSH ed25519 private key.
    Sign {
        bundle: PathBuf,
        /// OpenSSH private key (passphrase from ROLLGUARD_KEY_PASSPHRASE if
        /// encrypted); with --agent, the public key (KEY.pub) of the agent's
        /// key to sign with.
        #[arg(long)]
        key: PathBuf,
        /// Sign through ssh-agent (SSH_AUTH_SOCK): the private key never
        /// leaves the agent.
        #[arg(long)]
        agent: bool,
        /// The principal you sign as (as listed in allowed_signers).
        #[arg(long)]
        signer: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Attach a signature made with `ssh-keygen -Y sign -n rollguard-bundle` over `bundle manifest`.
    AttachSignature {
        bundle: PathBuf,
        /// The .sig file ssh-keygen wrote.
        signature: PathBuf,
        /// The principal the signature claims.
        #[arg(long)]
        signer: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Verify signatures (distinct principals), expiry and payload digests.
    ///
    /// Exit status 0 when the bundle is valid; 1 with a specific message when
    /// it is not.
    Verify {
        bundle: PathBuf,
        /// OpenSSH allowed_signers file that decides which signatures count.
        #[arg(long)]
        allowed_signers: PathBuf,
        /// Distinct principals required.
        #[arg(long, default_value_t = 1)]
        threshold: usize,
        #[arg(long)]
        json: bool,
    },
    /// Show the blast radius a reviewer signs off on.
    Inspect {
        bundle: PathBuf,
        /// Also say which signatures this trust file accepts.
        #[arg(long)]
        allowed_signers: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

/// Run a bundle subcommand.
pub fn run(command: BundleCommand) -> Result<ExitCode> {
    match command {
        BundleCommand::Init { dir } => init(&dir).map(|_| ExitCode::SUCCESS),
        BundleCommand::Build {
            src,
            output,
            zstd,
            json,
        } => build(&src, &output, zstd, json),
        BundleCommand::Manifest { bundle } => {
            let opened = open(&bundle)?;
            std::io::stdout().write_all(&opened.manifest_bytes)?;
            Ok(ExitCode::SUCCESS)
        }
        BundleCommand::Sign {
            bundle,
            key,
            agent,
            signer,
            json,
        } => sign(&bundle, &key, agent, signer, json),
        BundleCommand::AttachSignature {
            bundle,
            signature,
            signer,
            json,
        } => attach(&bundle, &signature, signer, json),
        BundleCommand::Verify {
            bundle,
            allowed_signers,
            threshold,
            json,
        } => verify(&bundle, &allowed_signers, threshold, json),
        BundleCommand::Inspect {
            bundle,
            allowed_signers,
            json,
        } => inspect(&bundle, allowed_signers.as_deref(), json),
    }
}

const SKELETON_SCRIPT: &str = "#!/bin/sh\n\
# Runs confined: only the paths in bundle.toml's [scope] can change.\n\
set -eu\n\
echo \"hello from $ROLLGUARD_BUNDLE on $ROLLGUARD_HOST\"\n";

fn init(dir: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if std::fs::read_dir(dir)?.next().is_some() {
        bail!(
            "{} is not empty; `bundle init` only writes into a new or empty directory",
            dir.display()
        );
    }
    for (name, text, mode) in [
        ("bundle.toml", SKELETON, 0o644),
        ("apply.sh", SKELETON_SCRIPT, 0o755),
    ] {
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        f.write_all(text.as_bytes())?;
    }
    println!("wrote {0}/bundle.toml and {0}/apply.sh; edit both, then `rollguard bundle build {0} -o NAME.bundle`", dir.display());
    Ok(())
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn open(path: &Path) -> Result<OpenedBundle<'static>> {
    archive::open_file(path, &Limits::default())
        .with_context(|| format!("{} is not a valid bundle", path.display()))
}

fn raw_signatures(stored: &[StoredSignature]) -> Vec<RawSignature> {
    stored
        .iter()
        .map(|s| RawSignature {
            armored: s.armored.clone(),
            signer: s.signer.clone(),
        })
        .collect()
}

fn build(src: &Path, output: &Path, zstd: bool, json: bool) -> Result<ExitCode> {
    // `[packages]`: read each package and derive the scope its install
    // needs; the derived table becomes part of the signed manifest.
    let source_path = src.join(archive::SOURCE_MANIFEST);
    let source_text = std::fs::read_to_string(&source_path)
        .with_context(|| format!("reading {}", source_path.display()))?;
    // The error's own text, once (its source chain repeats it).
    let source = rollguard_shared::SourceManifest::parse(&source_text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", source_path.display()))?;
    let derived = match &source.packages {
        Some(req) => Some(crate::packages::derive(src, req)?),
        None => None,
    };
    let warnings = derived
        .as_ref()
        .map(|d| d.warnings.clone())
        .unwrap_or_default();
    for w in &warnings {
        if !json {
            eprintln!("warning: {w}");
        }
    }
    let built = archive::build(
        src,
        &BuildOptions {
            zstd,
            limits: Limits::default(),
            packages: derived.map(|d| d.derivation),
        },
    )
    .with_context(|| format!("building a bundle from {}", src.display()))?;
    archive::write_bundle_file(output, &built.bytes)
        .with_context(|| format!("writing {}", output.display()))?;
    let m = &built.manifest;
    if json {
        println!(
            "{}",
            json!({
                "bundle": output,
                "name": m.bundle.name,
                "version": m.bundle.version,
                "files": m.payload.len(),
                "payload_bytes": m.payload_size(),
                "manifest_sha256": sha256_hex(&built.manifest_bytes),
                "bundle_sha256": sha256_hex(&built.bytes),
                "compressed": zstd,
                "warnings": warnings,
            })
        );
    } else {
        println!(
            "built {} ({} v{}, {} files, {} bytes of payload); unsigned: sign it with `rollguard bundle sign {} --key KEY`",
            output.display(),
            m.bundle.name,
            m.bundle.version,
            m.payload.len(),
            m.payload_size(),
            output.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn add_signature(bundle: &Path, sig: RawSignature, json: bool) -> Result<ExitCode> {
    let bytes = std::fs::read(bundle).with_context(|| format!("reading {}", bundle.display()))?;
    let fingerprint =
        signature::public_key_fingerprint(&sig).unwrap_or_else(|_| "unknown key".into());
    let signer = sig.signer.clone();
    let new = archive::add_signature(
        &bytes,
        StoredSignature {
            armored: sig.armored,
            signer: sig.signer,
        },
        &Limits::default(),
    )
    .with_context(|| format!("adding the signature to {}", bundle.display()))?;
    archive::write_bundle_file(bundle, &new)
        .with_context(|| format!("writing {}", bundle.display()))?;
    let count = archive::open(new.as_slice(), &Limits::default())?
        .signatures
        .len();
    if json {
        println!(
            "{}",
            json!({"bundle": bundle, "key": fingerprint, "signer": signer, "signatures": count})
        );
    } else {
        println!(
            "signed {} with {}{} ({} signature{} now)",
            bundle.display(),
            fingerprint,
            signer.map(|s| format!(" as {s}")).unwrap_or_default(),
            count,
            if count == 1 { "" } else { "s" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn sign(
    bundle: &Path,
    key: &Path,
    agent: bool,
    signer: Option<String>,
    json: bool,
) -> Result<ExitCode> {
    let opened = open(bundle)?;
    let sig = if agent {
        let text = std::fs::read_to_string(key)
            .with_context(|| format!("reading public key {}", key.display()))?;
        let public = signature::PublicKey::from_openssh(text.trim())
            .with_context(|| format!("{} is not an OpenSSH public key", key.display()))?;
        let socket = signature::agent::socket_from_env()?;
        signature::agent::sign(&opened.manifest_bytes, &public, &socket, signer)?
    } else {
        let key = signature::load_private_key(key)
            .with_context(|| format!("loading key {}", key.display()))?;
        signature::sign(&opened.manifest_bytes, &key, signer)?
    };
    drop(opened);
    add_signature(bundle, sig, json)
}

fn attach(bundle: &Path, sig_file: &Path, signer: Option<String>, json: bool) -> Result<ExitCode> {
    let armored = std::fs::read_to_string(sig_file)
        .with_context(|| format!("reading {}", sig_file.display()))?;
    let sig = RawSignature { armored, signer };
    // Refuse a signature that does not even verify over these bytes (wrong
    // file signed, wrong namespace): attaching it could only confuse
    // reviewers. Whether its key is trusted is each host's decision.
    let opened = open(bundle)?;
    let evaluation = signature::evaluate(
        &opened.manifest_bytes,
        std::slice::from_ref(&sig),
        &AllowedSigners::default(),
        jiff::Timestamp::now(),
    );
    if let Some(diag) = evaluation.signatures.first() {
        use signature::Rejection;
        match diag.rejection() {
            None | Some(Rejection::KeyNotAllowed) | Some(Rejection::SignerNotListed { .. }) => {}
            Some(_) => bail!(
                "{} does not verify over this bundle's manifest: {diag}",
                sig_file.display()
            ),
        }
    }
    drop(opened);
    add_signature(bundle, sig, json)
}

/// Why `verify` failed; the JSON `failure` field.
fn verify(bundle: &Path, allowed: &Path, threshold: usize, json: bool) -> Result<ExitCode> {
    let fail = |kind: &str, message: String, extra: serde_json::Value| -> Result<ExitCode> {
        if json {
            println!(
                "{}",
                json!({"valid": false, "failure": kind, "error": message, "details": extra})
            );
        } else {
            eprintln!("invalid bundle: {message}");
        }
        Ok(Exit::Failed.into())
    };
    let opened = match archive::open_file(bundle, &Limits::default()) {
        Ok(o) => o,
        Err(e) => return fail("bad_bundle", e.to_string(), json!(null)),
    };
    let allowed_signers =
        AllowedSigners::load(allowed).with_context(|| format!("loading {}", allowed.display()))?;
    let now = jiff::Timestamp::now();
    let sigs = raw_signatures(&opened.signatures);
    let verified = match signature::verify_threshold(
        &opened.manifest_bytes,
        &sigs,
        &allowed_signers,
        now,
        threshold,
    ) {
        Ok(v) => v,
        Err(VerifyError::ZeroThreshold) => bail!("--threshold must be at least 1"),
        Err(e) => {
            let details = serde_json::to_value(e.diagnostics())?;
            return fail("signatures", e.to_string(), details);
        }
    };
    let manifest: Manifest = opened.manifest.clone();
    if manifest.is_expired(now) {
        return fail(
            "expired",
            format!("bundle expired at {}", manifest.bundle.expires),
            json!(null),
        );
    }
    let summary = match opened.verify_payload() {
        Ok(s) => s,
        Err(e) => return fail("payload", e.to_string(), json!(null)),
    };
    if json {
        println!(
            "{}",
            json!({
                "valid": true,
                "name": manifest.bundle.name,
                "version": manifest.bundle.version,
                "signers": verified.principals,
                "threshold": threshold,
                "expires": manifest.bundle.expires,
                "files": summary.files,
                "payload_bytes": summary.bytes,
                "signatures": verified.signatures,
            })
        );
    } else {
        println!(
            "valid: {} v{} signed by {} (threshold {}), expires {}, {} payload files verified",
            manifest.bundle.name,
            manifest.bundle.version,
            verified.principals.join(", "),
            threshold,
            manifest.bundle.expires,
            summary.files
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The blast radius of a bundle as `bundle inspect --json` prints it (and
/// the web view shows it): targets, scopes, signers, expiry, warnings.
/// `allowed`: the signers to evaluate the signatures against, if any.
pub fn inspection(
    opened: &OpenedBundle<'_>,
    allowed: Option<&AllowedSigners>,
    now: jiff::Timestamp,
) -> serde_json::Value {
    let sigs = raw_signatures(&opened.signatures);
    let none = AllowedSigners::default();
    let evaluation =
        signature::evaluate(&opened.manifest_bytes, &sigs, allowed.unwrap_or(&none), now);
    let m = &opened.manifest;
    json!({
        "name": m.bundle.name,
        "version": m.bundle.version,
        "description": m.bundle.description,
        "expires": m.bundle.expires,
        "expired": m.is_expired(now),
        "manifest_sha256": sha256_hex(&opened.manifest_bytes),
        "targets": m.targets,
        "scope": m.scope,
        "packages": m.packages,
        "run": m.run,
        "services": m.services,
        "payload": m.payload,
        "signatures": evaluation.signatures,
        "trusted_principals": allowed.map(|_| &evaluation.principals),
        "warnings": blast_radius_warnings(m, now),
    })
}

fn inspect(bundle: &Path, allowed: Option<&Path>, json: bool) -> Result<ExitCode> {
    let opened = open(bundle)?;
    let allowed_signers = match allowed {
        Some(p) => AllowedSigners::load(p).with_context(|| format!("loading {}", p.display()))?,
        None => AllowedSigners::default(),
    };
    let now = jiff::Timestamp::now();
    if json {
        let trusted = allowed.map(|_| &allowed_signers);
        println!("{}", inspection(&opened, trusted, now));
        return Ok(ExitCode::SUCCESS);
    }
    let sigs = raw_signatures(&opened.signatures);
    let evaluation = signature::evaluate(&opened.manifest_bytes, &sigs, &allowed_signers, now);
    let m = &opened.manifest;
    let warnings = blast_radius_warnings(m, now);
    let mut out = String::new();
    let list = |v: Vec<String>| {
        if v.is_empty() {
            "(none)".to_string()
        } else {
            v.join(", ")
        }
    };
    out.push_str(&format!(
        "bundle      {} v{}\n",
        m.bundle.name, m.bundle.version
    ));
    if !m.bundle.description.is_empty() {
        out.push_str(&format!("            {}\n", m.bundle.description));
    }
    out.push_str(&format!(
        "expires     {}{}\n",
        m.bundle.expires,
        if m.is_expired(now) { "  (EXPIRED)" } else { "" }
    ));
    out.push_str(&format!(
        "manifest    sha256:{}\n\n",
        sha256_hex(&opened.manifest_bytes)
    ));
    out.push_str("WHERE it runs\n");
    out.push_str(&format!(
        "  hosts     {}\n",
        list(
            m.targets
                .hosts()
                .iter()
                .map(|h| h.as_str().to_string())
                .collect()
        )
    ));
    out.push_str(&format!(
        "  labels    {}\n\n",
        list(
            m.targets
                .labels()
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect()
        )
    ));
    out.push_str("WHAT it may change (everything else is read-only; host-protected paths are always off limits)\n");
    out.push_str(&format!(
        "  write     {}\n",
        list(m.scope.write.iter().map(|p| p.to_string()).collect())
    ));
    out.push_str(&format!(
        "  delete    {}\n",
        list(m.scope.delete.iter().map(|p| p.to_string()).collect())
    ));
    out.push_str(&format!(
        "  read      {}\n",
        if m.scope.read.is_empty() {
            "everything except host-protected paths".to_string()
        } else {
            list(m.scope.read.iter().map(|p| p.to_string()).collect())
        }
    ));
    out.push_str(&format!(
        "  network   {}\n",
        if m.scope.network.is_empty() {
            "none (private network namespace)".to_string()
        } else {
            list(
                m.scope
                    .network
                    .iter()
                    .map(|e| match e.host {
                        EndpointHost::Name(_) => {
                            format!("{e} (name: resolved by each agent at run start)")
                        }
                        EndpointHost::Net(_) => e.to_string(),
                    })
                    .collect(),
            )
        }
    ));
    if let Some(p) = &m.packages {
        out.push_str(&format!(
            "  packages  installed with {} inside the sandbox:\n",
            p.kind
        ));
        for pkg in &p.install {
            out.push_str(&format!(
                "    {} {}  ({})\n",
                pkg.name, pkg.version, pkg.file
            ));
        }
        out.push_str(&format!(
            "  derived from the packages by `rollguard bundle build` (signed; the agent enforces it with the scope above):\n    database  {}\n",
            p.database
        ));
        out.push_str(&format!(
            "    write     {}\n",
            list(p.write.iter().map(|p| p.to_string()).collect())
        ));
        out.push_str(&format!(
            "    delete    {}\n\n",
            list(p.delete.iter().map(|p| p.to_string()).collect())
        ));
    }
    out.push_str(&services_lines(&m.services));
    out.push_str("WHAT it runs\n");
    out.push_str(&format!(
        "  command   {}\n",
        if m.run.command.is_empty() {
            "(none: the package install only)".to_string()
        } else {
            format!("{:?}", m.run.command)
        }
    ));
    out.push_str(&format!(
        "  timeout   {}\n",
        humantime::format_duration(m.run.timeout)
    ));
    out.push_str(&format!(
        "  payload   {} files, {} bytes\n",
        m.payload.len(),
        m.payload_size()
    ));
    for f in &m.payload {
        out.push_str(&format!(
            "    {:04o} {:>10}  {}  sha256:{}\n",
            f.mode,
            f.size,
            f.path,
            &hex::encode(f.sha256)[..16]
        ));
    }
    out.push_str(&format!("\nSIGNATURES ({})\n", evaluation.signatures.len()));
    if evaluation.signatures.is_empty() {
        out.push_str("  (none: no host will run this bundle)\n");
    }
    for d in &evaluation.signatures {
        out.push_str(&format!("  {d}\n"));
    }
    if allowed.is_some() {
        out.push_str(&format!(
            "  trusted principals: {}\n",
            list(evaluation.principals.clone())
        ));
    }
    if !warnings.is_empty() {
        out.push_str("\nWARNINGS\n");
        for w in &warnings {
            out.push_str(&format!("  ! {w}\n"));
        }
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

/// Things a reviewer should look at twice.
fn blast_radius_warnings(m: &Manifest, now: jiff::Timestamp) -> Vec<String> {
    let mut w = Vec::new();
    if m.targets.matches_every_name() {
        w.push("a host pattern matches EVERY host name".to_string());
    }
    let effective = m.effective_scope();
    if !effective.delete.is_empty() {
        w.push(format!(
            "deletes beneath {} (hosts may require more signers for deleting bundles)",
            effective
                .delete
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for p in effective.write.iter().chain(&effective.delete) {
        if p.as_path().components().count() <= 2 {
            w.push(format!("{p} is a top-level directory: a broad scope"));
        }
    }
    if !m.scope.network.is_empty() {
        w.push(
            "has network access (to the listed protocol, address and port only, enforced by the kernel)"
                .to_string(),
        );
    }
    if m.is_expired(now) {
        w.push("expired: agents will refuse it".to_string());
    }
    w
}

/// `[services]` under "WHAT it may change": what the agent will do to the
/// host's services after the run (each unit must be in the host's allow
/// list, or the host refuses the bundle).
fn services_lines(s: &rollguard_shared::manifest::Services) -> String {
    let names = |v: &[rollguard_shared::services::UnitName]| {
        if v.is_empty() {
            "(none)".to_string()
        } else {
            v.iter().map(|u| u.as_str()).collect::<Vec<_>>().join(", ")
        }
    };
    format!(
        "  services  reload {}; restart {}; restart stale {} (performed by the agent after the run, if the host allows each unit)\n\n",
        names(&s.reload),
        names(&s.restart),
        if s.restart_stale { "yes" } else { "no" }
    )
}
