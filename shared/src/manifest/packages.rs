//! `[packages]`: .deb or .rpm files from the payload that the agent
//! installs inside the sandbox, and the scope derived from them.
//!
//! The author writes only `install`. `rollguard bundle build` reads each
//! package (its file list and maintainer scripts) and appends a generated
//! `[packages.derived]` table to the built manifest: the package manager,
//! its database, each package's name and version, and the directories the
//! install writes and deletes in. Signatures cover it like the rest, so the
//! signers sign what the packages will touch. The derived scope is kept
//! apart from the author's `[scope]` so `inspect` can show where each path
//! came from; the agent checks and enforces the union of both.
//!
//! A source manifest may not contain `[packages.derived]`; a built manifest
//! with `[packages]` must.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::{ManifestError, PayloadPath, Scope};
use crate::path::ScopePath;

/// Most packages in one bundle.
pub const MAX_PACKAGES: usize = 64;
/// Most derived scope entries (a package's directories, merged).
pub const MAX_DERIVED_PATHS: usize = 4096;

/// The package format of a bundle (one kind per bundle).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PackageKind {
    /// `.deb`, installed with `dpkg`.
    Deb,
    /// `.rpm`, installed with `rpm`.
    Rpm,
}

impl PackageKind {
    /// From the file name's extension.
    pub fn of(path: &PayloadPath) -> Option<Self> {
        let p = path.as_str();
        if p.ends_with(".deb") {
            Some(PackageKind::Deb)
        } else if p.ends_with(".rpm") {
            Some(PackageKind::Rpm)
        } else {
            None
        }
    }

    /// The package manager's name as the derived table spells it.
    pub fn manager(self) -> &'static str {
        match self {
            PackageKind::Deb => "dpkg",
            PackageKind::Rpm => "rpm",
        }
    }
}

impl fmt::Display for PackageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.manager())
    }
}

/// The dpkg database (`--admindir`) the agent installs into, and that
/// `rollguard bundle build` derives for a `.deb`.
pub const DPKG_ADMINDIR: &str = "/var/lib/dpkg";
/// dpkg's log as the agent passes it (`--log`), derived likewise.
pub const DPKG_LOG: &str = "/var/log/dpkg.log";
/// Where `deb-systemd-helper` records which units it enabled, derived
/// when a .deb's maintainer scripts call it.
pub const DEB_SYSTEMD_HELPER_STATE: &str = "/var/lib/systemd/deb-systemd-helper-enabled";

/// `[packages]` of a source manifest: what the author asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PackageRequest {
    pub kind: PackageKind,
    /// Payload files, in the order given (the order they are passed to the
    /// package manager, which orders the install itself).
    pub install: Vec<PayloadPath>,
}

/// A package name or version as the manager reports it:
/// 1-128 characters of `[A-Za-z0-9.+~:_-]`, not starting with `-`. Debian
/// and rpm names and versions fit; nothing here can be read as an option
/// or need quoting.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct PackageToken(String);

impl PackageToken {
    pub fn parse(raw: &str) -> Option<Self> {
        let ok = !raw.is_empty()
            && raw.len() <= 128
            && !raw.starts_with('-')
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".+~:_-".contains(&b));
        ok.then(|| PackageToken(raw.to_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PackageToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One package of a built bundle: its payload file and what it says it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DerivedPackage {
    pub file: PayloadPath,
    pub name: PackageToken,
    /// The full version (`[epoch:]upstream[-revision]` for dpkg,
    /// `[epoch:]version-release` for rpm).
    pub version: PackageToken,
}

/// `[packages]` plus the generated `[packages.derived]` of a built manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Packages {
    pub kind: PackageKind,
    pub install: Vec<DerivedPackage>,
    /// The package database directory (`/var/lib/dpkg`, rpm's `%_dbpath`).
    pub database: ScopePath,
    /// Create, modify and truncate beneath these (the packages' directories,
    /// the database, the package manager's log).
    pub write: Vec<ScopePath>,
    /// Unlink, rmdir and rename-away beneath these.
    pub delete: Vec<ScopePath>,
}

impl Packages {
    /// The derived scope as a [`Scope`] (no reads, no network).
    pub fn scope(&self) -> Scope {
        Scope {
            write: self.write.clone(),
            delete: self.delete.clone(),
            read: vec![],
            network: vec![],
        }
    }
}

/// The derived table as `rollguard bundle build` computes it, before it is
/// rendered into the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derivation {
    pub kind: PackageKind,
    pub packages: Vec<DerivedPackage>,
    pub database: ScopePath,
    pub write: BTreeSet<ScopePath>,
    pub delete: BTreeSet<ScopePath>,
}

impl Derivation {
    /// The TOML text appended to the built manifest.
    pub fn render(&self) -> String {
        let s = |v: &str| toml::Value::String(v.to_string()).to_string();
        let list = |set: &BTreeSet<ScopePath>| {
            let mut out = String::from("[\n");
            for p in set {
                out.push_str(&format!("  {},\n", s(&p.to_string())));
            }
            out.push(']');
            out
        };
        let mut out = String::new();
        out.push_str(
            "\n# --- generated by `rollguard bundle build` from the packages; signatures cover these bytes ---\n",
        );
        out.push_str("[packages.derived]\n");
        out.push_str(&format!("manager = {}\n", s(self.kind.manager())));
        out.push_str(&format!("database = {}\n", s(&self.database.to_string())));
        out.push_str("packages = [\n");
        for p in &self.packages {
            out.push_str(&format!(
                "  {{ file = {}, name = {}, version = {} }},\n",
                s(p.file.as_str()),
                s(p.name.as_str()),
                s(p.version.as_str())
            ));
        }
        out.push_str("]\n");
        out.push_str(&format!("write = {}\n", list(&self.write)));
        out.push_str(&format!("delete = {}\n", list(&self.delete)));
        out
    }
}

// ---- raw serde layer ------------------------------------------------------

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPackages {
    install: Vec<String>,
    derived: Option<RawDerived>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDerived {
    manager: String,
    database: String,
    packages: Vec<RawDerivedPackage>,
    write: Vec<String>,
    delete: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDerivedPackage {
    file: String,
    name: String,
    version: String,
}

fn bad(why: impl Into<String>) -> ManifestError {
    ManifestError::Packages(why.into())
}

impl RawPackages {
    /// The author's part, as in a source manifest.
    pub(super) fn request(&self) -> Result<PackageRequest, ManifestError> {
        if self.install.is_empty() {
            return Err(bad("install is empty (leave out [packages] instead)"));
        }
        if self.install.len() > MAX_PACKAGES {
            return Err(bad(format!("install has more than {MAX_PACKAGES} entries")));
        }
        let mut install = Vec::with_capacity(self.install.len());
        let mut kind = None;
        for raw in &self.install {
            let raw_rel = raw.strip_prefix("./").unwrap_or(raw);
            let path = PayloadPath::parse(raw_rel)
                .map_err(|e| bad(format!("install entry {raw:?}: {e}")))?;
            let k = PackageKind::of(&path).ok_or_else(|| {
                bad(format!(
                    "install entry {raw:?} is neither a .deb nor an .rpm file"
                ))
            })?;
            if kind.is_some_and(|other| other != k) {
                return Err(bad(
                    "install mixes .deb and .rpm files: use one bundle per package manager",
                ));
            }
            kind = Some(k);
            if install.contains(&path) {
                return Err(bad(format!("install lists {raw:?} twice")));
            }
            install.push(path);
        }
        Ok(PackageRequest {
            kind: kind.expect("install is not empty"),
            install,
        })
    }

    pub(super) fn has_derived(&self) -> bool {
        self.derived.is_some()
    }

    /// The whole table of a built manifest.
    pub(super) fn built(&self) -> Result<Packages, ManifestError> {
        let request = self.request()?;
        let derived = self.derived.as_ref().ok_or_else(|| {
            bad("the manifest has [packages] but no generated [packages.derived]: build it with `rollguard bundle build`")
        })?;
        if derived.manager != request.kind.manager() {
            return Err(bad(format!(
                "derived.manager {:?} does not match the {} files in install",
                derived.manager,
                request.kind.manager()
            )));
        }
        let database = ScopePath::parse(&derived.database)
            .map_err(|e| bad(format!("derived.database: {e}")))?;
        if derived.packages.len() != request.install.len() {
            return Err(bad(
                "derived.packages does not list exactly the files in install",
            ));
        }
        let mut install = Vec::with_capacity(derived.packages.len());
        for (raw, file) in derived.packages.iter().zip(&request.install) {
            if raw.file != file.as_str() {
                return Err(bad(format!(
                    "derived.packages lists {:?} where install has {:?}",
                    raw.file,
                    file.as_str()
                )));
            }
            let token = |what: &str, v: &str| {
                PackageToken::parse(v).ok_or_else(|| {
                    bad(format!(
                        "derived.packages: {what} {v:?} of {:?} is invalid",
                        raw.file
                    ))
                })
            };
            install.push(DerivedPackage {
                file: file.clone(),
                name: token("name", &raw.name)?,
                version: token("version", &raw.version)?,
            });
        }
        let paths = |key: &'static str, raw: &[String]| -> Result<Vec<ScopePath>, ManifestError> {
            if raw.len() > MAX_DERIVED_PATHS {
                return Err(bad(format!(
                    "derived.{key} has more than {MAX_DERIVED_PATHS} entries"
                )));
            }
            let mut out = raw
                .iter()
                .map(|p| ScopePath::parse(p).map_err(|e| bad(format!("derived.{key}: {e}"))))
                .collect::<Result<Vec<_>, _>>()?;
            out.sort();
            out.dedup();
            Ok(out)
        };
        Ok(Packages {
            kind: request.kind,
            install,
            database,
            write: paths("write", &derived.write)?,
            delete: paths("delete", &derived.delete)?,
        })
    }
}
