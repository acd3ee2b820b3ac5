//! Deriving the scope of a bundle's `[packages]` at `rollguard bundle build`.
//!
//! Each package is read with its own package manager's tools (`dpkg-deb`,
//! `rpm -qp`), which parse their formats exactly as the agent's `dpkg` or
//! `rpm` will; no crate parses both .deb and .rpm as completely. From the
//! facts in the package (never from guesses) we derive:
//!
//! - **its directories, write and delete**: the parent directory of every
//!   file, symlink and hard link it ships, and every directory it ships
//!   with nothing in it. Landlock grants creating and removing entries per
//!   directory, not per name, and both managers write `NAME.dpkg-new` (or
//!   `NAME;XXXXXXXX`) and rename it over `NAME`, so the whole directory is
//!   granted (everything beneath it, except the host's protected paths);
//! - **the package database**, write and delete: `/var/lib/dpkg` (status,
//!   info/, updates/, triggers/, the lock files) or rpm's `%_dbpath` on the
//!   building machine (the agent refuses when its host's differs);
//! - **dpkg's log**, write: `/var/log/dpkg.log` (the agent passes that path
//!   to dpkg, so the fact holds);
//! - **alternatives**, write and delete: `/etc/alternatives` when a
//!   maintainer script calls `update-alternatives` (its database is beneath
//!   `/var/lib/dpkg`);
//! - **unit enablement state**, write and delete:
//!   `/var/lib/systemd/deb-systemd-helper-enabled` when a .deb's maintainer
//!   script calls `deb-systemd-helper` (debhelper's `dh_installsystemd`
//!   snippet, in nearly every Debian package shipping a service). On an
//!   upgrade it rewrites its state files there (a temporary file renamed
//!   over `UNIT.dsh-also`) whether or not anything changes; without this
//!   every service package's upgrade would be denied;
//! - **unit enablement links**, write only: `/etc/systemd/system/
//!   TARGET.wants` (`.requires`, `.upholds`) for each `WantedBy=`
//!   (`RequiredBy=`, `UpheldBy=`) in the `[Install]` section of a unit the
//!   .deb ships in a vendor unit directory and names in its maintainer
//!   scripts, when they call `deb-systemd-helper` (whose `enable` links
//!   the unit there: on a first install through `systemctl --root=/
//!   preset`, on an upgrade for a link that is missing). Creating a link
//!   is all either does, so no delete: other units' links there stay out
//!   of reach. Those directories only: an `Alias=` (a link directly in
//!   `/etc/systemd/system`) is warned about and not derived, nor is a
//!   target named after the agent's own unit, and agents pin their own
//!   enablement link inside such a directory. rpm scriptlets enable units
//!   with `systemctl preset` without `--root`, which the sandbox's
//!   `systemctl` records without acting (docs/services.md), so nothing is
//!   derived for them.
//!
//! Nothing else: what a maintainer script writes beyond this is denied by
//! the kernel and reported, which is the point. The agent creates missing
//! package directories (as root, mode 0755) before the sandbox starts, as
//! Landlock cannot grant creating one directory; so a package directory
//! that would need another owner or mode is refused here.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use rollguard_shared::manifest::packages::PackageToken;
use rollguard_shared::manifest::{Derivation, DerivedPackage, PackageKind, PackageRequest};
use rollguard_shared::path::ScopePath;
use rollguard_shared::services::{UnitName, AGENT_UNIT, ENABLEMENT_DIRS};

use rollguard_shared::manifest::packages::{DEB_SYSTEMD_HELPER_STATE, DPKG_ADMINDIR, DPKG_LOG};
/// Where `update-alternatives` keeps its links.
const ALTERNATIVES: &str = "/etc/alternatives";
/// Where `deb-systemd-helper enable` (like `systemctl enable`) makes a
/// unit's enablement links.
const ENABLEMENT_ROOT: &str = "/etc/systemd/system";
/// The vendor unit directories `deb-systemd-helper` reads units from.
const VENDOR_UNIT_DIRS: [&str; 2] = ["/lib/systemd/system", "/usr/lib/systemd/system"];
/// A unit file larger than this is not read for its `[Install]` section
/// (a unit is a few hundred bytes; this bounds what a hostile package
/// makes `build` hold).
const MAX_UNIT_BYTES: u64 = 64 * 1024;

/// Directories where agents protect files of their own, so a write scope
/// on (or above) them is refused by every agent: a package writing there
/// is warned about at build (until agents pin their own files instead).
const AGENT_PROTECTED_DIRS: &[(&str, &str)] = &[
    ("/etc/systemd/system", "agents protect their own unit"),
    (
        "/usr/local/lib/systemd/system",
        "agents protect their own unit",
    ),
    ("/usr/lib/systemd/system", "agents protect their own unit"),
    ("/lib/systemd/system", "agents protect their own unit"),
    (
        "/etc/ld.so.conf.d",
        "agents protect the dynamic loader's configuration",
    ),
    (
        "/etc",
        "agents protect the dynamic loader's configuration and /etc/rollguard",
    ),
    ("/usr/sbin", "packaged agents protect their own programs"),
];

/// One entry of a package's file list.
#[derive(Debug)]
struct Entry {
    path: ScopePath,
    is_dir: bool,
    /// Permission bits.
    mode: u32,
    owner: String,
    group: String,
}

/// The derivation and the warnings for the reviewer.
pub struct Derived {
    pub derivation: Derivation,
    pub warnings: Vec<String>,
}

/// Read every package of `req` (relative to `src_dir`) and derive the scope.
pub fn derive(src_dir: &Path, req: &PackageRequest) -> Result<Derived> {
    let mut packages = Vec::new();
    let mut dirs = BTreeSet::new();
    let mut alternatives = false;
    let mut systemd_helper = false;
    let mut enablement: BTreeSet<ScopePath> = BTreeSet::new();
    let mut warnings = Vec::new();
    for file in &req.install {
        let path = src_dir.join(file.as_str());
        let meta = std::fs::symlink_metadata(&path)
            .with_context(|| format!("[packages] {}", path.display()))?;
        if !meta.is_file() {
            bail!("[packages] {} is not a regular file", path.display());
        }
        let PackageFacts {
            name,
            version,
            entries,
            scripts,
            units,
        } = match req.kind {
            PackageKind::Deb => read_deb(&path)?,
            PackageKind::Rpm => read_rpm(&path)?,
        };
        let token = |what: &str, v: &str| {
            PackageToken::parse(v).with_context(|| {
                format!(
                    "{}: {what} {v:?} is not a plain package token",
                    path.display()
                )
            })
        };
        packages.push(DerivedPackage {
            file: file.clone(),
            name: token("name", &name)?,
            version: token("version", &version)?,
        });
        let pkg_dirs = package_dirs(&entries)
            .with_context(|| format!("deriving the directories of {}", path.display()))?;
        for d in &pkg_dirs {
            // `/etc` itself (a file directly in /etc), not everything in it.
            let hit = AGENT_PROTECTED_DIRS.iter().find(|(dir, _)| {
                d.as_path() == Path::new(dir) || (*dir != "/etc" && d.as_path().starts_with(dir))
            });
            if let Some((dir, why)) = hit {
                warnings.push(format!(
                    "{file} writes into {dir}, where {why}: agents refuse it unless those files are pinned read-only"
                ));
            }
        }
        dirs.extend(pkg_dirs);
        alternatives |= scripts.contains("update-alternatives");
        let helper = req.kind == PackageKind::Deb && scripts.contains("deb-systemd-helper");
        systemd_helper |= helper;
        if helper {
            for unit in &units {
                if unit.too_large {
                    warnings.push(format!(
                        "{file}: unit {} is larger than {MAX_UNIT_BYTES} bytes: its [Install] section is not read, no enablement directory derived for it",
                        unit.path
                    ));
                    continue;
                }
                // Only the units the scripts name (debhelper's snippet
                // quotes each: `deb-systemd-helper enable 'foo.service'`).
                let named = unit
                    .path
                    .as_path()
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| scripts.contains(n));
                if !named {
                    continue;
                }
                enablement.extend(unit.install.enablement_dirs.iter().cloned());
                for alias in &unit.install.aliases {
                    warnings.push(format!(
                        "{file}: unit {} has Alias={alias}: its link {ENABLEMENT_ROOT}/{alias} is not in the derived scope (agents deny it)",
                        unit.path
                    ));
                }
                for bad in &unit.install.unusable {
                    warnings.push(format!(
                        "{file}: unit {}: [Install] {bad}: not a plain unit name (or the agent's own unit), no enablement directory derived for it",
                        unit.path
                    ));
                }
            }
        }
    }
    let database = match req.kind {
        PackageKind::Deb => ScopePath::parse(DPKG_ADMINDIR).expect("constant"),
        PackageKind::Rpm => rpm_dbpath()?,
    };
    let mut write: BTreeSet<ScopePath> = dirs.clone();
    let mut delete = dirs;
    write.insert(database.clone());
    delete.insert(database.clone());
    if req.kind == PackageKind::Deb {
        write.insert(ScopePath::parse(DPKG_LOG).expect("constant"));
    }
    if alternatives {
        let alt = ScopePath::parse(ALTERNATIVES).expect("constant");
        write.insert(alt.clone());
        delete.insert(alt);
    }
    if systemd_helper {
        let state = ScopePath::parse(DEB_SYSTEMD_HELPER_STATE).expect("constant");
        write.insert(state.clone());
        delete.insert(state);
    }
    write.extend(enablement);
    Ok(Derived {
        derivation: Derivation {
            kind: req.kind,
            packages,
            database,
            write,
            delete,
        },
        warnings,
    })
}

/// The directories a package's install creates and replaces entries in:
/// the parent of every non-directory entry and every empty directory it
/// ships. Each that the package ships itself must be root:root 0755 (the
/// agent creates missing ones so).
fn package_dirs(entries: &[Entry]) -> Result<BTreeSet<ScopePath>> {
    let shipped: BTreeMap<&Path, &Entry> = entries
        .iter()
        .filter(|e| e.is_dir)
        .map(|e| (e.path.as_path(), e))
        .collect();
    let mut has_child = BTreeSet::new();
    let mut out = BTreeSet::new();
    for e in entries {
        let parent = e.path.as_path().parent().unwrap_or(Path::new("/"));
        has_child.insert(parent.to_path_buf());
        if !e.is_dir {
            if parent == Path::new("/") {
                bail!(
                    "{} is a file directly in /: no scope can grant that",
                    e.path
                );
            }
            out.insert(ScopePath::parse(&parent.to_string_lossy()).context("a parent directory")?);
        }
    }
    for e in entries.iter().filter(|e| e.is_dir) {
        if !has_child.contains(e.path.as_path()) {
            out.insert(e.path.clone());
        }
    }
    for d in &out {
        if let Some(e) = shipped.get(d.as_path()) {
            if e.mode != 0o755 || !is_root(&e.owner) || !is_root(&e.group) {
                bail!(
                    "the package ships directory {} as {}:{} {:04o}; the agent creates missing package directories as root:root 0755 before the sandbox starts (Landlock cannot grant creating one directory), so only such directories can hold the package's files",
                    d,
                    e.owner,
                    e.group,
                    e.mode
                );
            }
        }
    }
    Ok(out)
}

fn is_root(name: &str) -> bool {
    name == "root" || name == "0"
}

fn run(cmd: &mut Command) -> Result<Vec<u8>> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("running {shown} (is the package manager installed?)"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// An archive member path (`./usr/bin/x`, `usr/bin/x`) as an absolute
/// scope path; `None` for the root itself.
fn member_path(raw: &Path) -> Result<Option<ScopePath>> {
    let mut abs = PathBuf::from("/");
    for c in raw.components() {
        match c {
            Component::CurDir | Component::RootDir => {}
            Component::Normal(n) => abs.push(n),
            _ => bail!("package member {} is not a plain path", raw.display()),
        }
    }
    if abs == Path::new("/") {
        return Ok(None);
    }
    let text = abs
        .to_str()
        .with_context(|| format!("package member {} is not UTF-8", abs.display()))?;
    Ok(Some(ScopePath::parse(text).with_context(|| {
        format!("package member {}", abs.display())
    })?))
}

/// What `build` reads from one package.
struct PackageFacts {
    name: String,
    version: String,
    entries: Vec<Entry>,
    /// The maintainer scripts (scriptlets), concatenated.
    scripts: String,
    /// The units it ships in a vendor unit directory (.deb only).
    units: Vec<ShippedUnit>,
}

/// A unit file a package ships, with what its `[Install]` section asks of
/// `deb-systemd-helper enable`.
struct ShippedUnit {
    path: ScopePath,
    install: InstallSection,
    /// Larger than [`MAX_UNIT_BYTES`]: not read.
    too_large: bool,
}

/// The parts of a unit's `[Install]` section that decide where
/// `deb-systemd-helper enable` makes links (systemd.unit(5)).
#[derive(Debug, Default, PartialEq, Eq)]
struct InstallSection {
    /// `/etc/systemd/system/TARGET.wants` for `WantedBy=TARGET`,
    /// `.requires` for `RequiredBy=`, `.upholds` for `UpheldBy=`.
    enablement_dirs: BTreeSet<ScopePath>,
    /// `Alias=` names (links directly in `/etc/systemd/system`).
    aliases: Vec<String>,
    /// Values that are not plain unit names (specifiers, paths), as
    /// `KEY=VALUE`.
    unusable: Vec<String>,
}

/// Parse the `[Install]` section of a unit file. Comments (`#`, `;`) and
/// other sections are skipped; a line ending in `\` continues on the next;
/// an empty assignment resets the key's list, as systemd does; a value in
/// double quotes is unquoted. A value is kept only if it is a unit name
/// by systemd's grammar ([`UnitName`]: no `/`, no specifier) and not the
/// agent's own unit, so it can only ever name a directory directly in
/// `/etc/systemd/system`, and never one that configures the agent.
fn parse_install(text: &str) -> InstallSection {
    let mut joined: Vec<String> = Vec::new();
    let mut continued = false;
    for raw in text.lines() {
        let line = raw.trim();
        let (body, continues) = match line.strip_suffix('\\') {
            Some(body) => (body, true),
            None => (line, false),
        };
        match joined.last_mut() {
            Some(last) if continued => {
                last.push(' ');
                last.push_str(body);
            }
            _ => joined.push(body.to_string()),
        }
        continued = continues;
    }
    let mut lists: BTreeMap<&'static str, Vec<&str>> = BTreeMap::new();
    let mut aliases = Vec::new();
    let mut in_install = false;
    for line in joined.iter().map(|l| l.trim()) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            in_install = line == "[Install]";
            continue;
        }
        let Some((key, value)) = line.split_once('=').filter(|_| in_install) else {
            continue;
        };
        let key = key.trim();
        let value = value.trim();
        if let Some((key, _)) = ENABLEMENT_DIRS.iter().find(|(k, _)| *k == key) {
            let list = lists.entry(key).or_default();
            if value.is_empty() {
                list.clear();
            }
            list.extend(value.split_whitespace().map(unquote));
        } else if key == "Alias" {
            aliases.extend(value.split_whitespace().map(|a| unquote(a).to_string()));
        }
    }
    let mut install = InstallSection {
        aliases,
        ..InstallSection::default()
    };
    for (key, suffix) in ENABLEMENT_DIRS {
        for &name in lists.get(key).into_iter().flatten() {
            // systemd's own grammar: no `/`, no specifier.
            let plain = UnitName::parse(name).is_ok() && name != AGENT_UNIT;
            match ScopePath::parse(&format!("{ENABLEMENT_ROOT}/{name}{suffix}")) {
                Ok(dir) if plain => {
                    install.enablement_dirs.insert(dir);
                }
                _ => install.unusable.push(format!("{key}={name}")),
            }
        }
    }
    install
}

/// A word of a unit file's value without the double quotes around it.
fn unquote(word: &str) -> &str {
    word.strip_prefix('"')
        .and_then(|w| w.strip_suffix('"'))
        .unwrap_or(word)
}

fn read_deb(path: &Path) -> Result<PackageFacts> {
    let fields = run(Command::new("dpkg-deb")
        .arg("--show")
        .arg("--showformat=${Package}\\t${Version}\\n")
        .arg(path))?;
    let fields = String::from_utf8(fields).context("dpkg-deb output is not UTF-8")?;
    let (name, version) = fields
        .trim_end()
        .split_once('\t')
        .with_context(|| format!("{}: unexpected dpkg-deb --show output", path.display()))?;
    let data = run(Command::new("dpkg-deb").arg("--fsys-tarfile").arg(path))?;
    let mut entries = Vec::new();
    let mut units = Vec::new();
    let mut archive = tar::Archive::new(&data[..]);
    for entry in archive.entries().context("reading the package's data")? {
        let mut entry = entry.context("reading the package's data")?;
        let Some(p) = member_path(&entry.path().context("member path")?)? else {
            continue;
        };
        let in_unit_dir = p
            .as_path()
            .parent()
            .is_some_and(|d| VENDOR_UNIT_DIRS.iter().any(|u| d == Path::new(u)));
        if in_unit_dir && entry.header().entry_type().is_file() {
            let too_large = entry.size() > MAX_UNIT_BYTES;
            let mut bytes = Vec::new();
            if !too_large {
                entry
                    .read_to_end(&mut bytes)
                    .with_context(|| format!("reading {p} in the package"))?;
            }
            units.push(ShippedUnit {
                path: p.clone(),
                install: parse_install(&String::from_utf8_lossy(&bytes)),
                too_large,
            });
        }
        let header = entry.header();
        let name_or_id = |n: Option<&str>, id: u64| n.map_or_else(|| id.to_string(), String::from);
        entries.push(Entry {
            path: p,
            is_dir: header.entry_type().is_dir(),
            mode: header.mode().context("member mode")? & 0o7777,
            owner: name_or_id(
                header.username().ok().flatten(),
                header.uid().unwrap_or(u64::MAX),
            ),
            group: name_or_id(
                header.groupname().ok().flatten(),
                header.gid().unwrap_or(u64::MAX),
            ),
        });
    }
    let control = run(Command::new("dpkg-deb").arg("--ctrl-tarfile").arg(path))?;
    let mut scripts = String::new();
    let mut archive = tar::Archive::new(&control[..]);
    for entry in archive.entries().context("reading the package's control")? {
        let mut entry = entry.context("reading the package's control")?;
        let name = entry.path().context("control member")?.to_path_buf();
        let is_script = matches!(
            name.file_name().and_then(|n| n.to_str()),
            Some("preinst" | "postinst" | "prerm" | "postrm" | "config" | "triggers")
        );
        if is_script {
            let mut text = String::new();
            // Binary maintainer programs are possible: read lossily.
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).context("control member")?;
            text.push_str(&String::from_utf8_lossy(&bytes));
            scripts.push_str(&text);
        }
    }
    Ok(PackageFacts {
        name: name.to_string(),
        version: version.to_string(),
        entries,
        scripts,
        units,
    })
}

fn read_rpm(path: &Path) -> Result<PackageFacts> {
    let rpm = |qf: &str| -> Result<String> {
        let out = run(Command::new("rpm")
            .args(["-qp", "--nosignature", "--qf", qf])
            .arg(path))?;
        String::from_utf8(out).context("rpm output is not UTF-8")
    };
    let ident = rpm("%{NAME}\\t%|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE}\\n")?;
    let (name, version) = ident
        .trim_end()
        .split_once('\t')
        .with_context(|| format!("{}: unexpected rpm output", path.display()))?;
    let list = rpm("[%{FILEMODES:octal}\\t%{FILEUSERNAME}\\t%{FILEGROUPNAME}\\t%{FILENAMES}\\n]")?;
    let mut entries = Vec::new();
    for line in list.lines().filter(|l| !l.is_empty() && *l != "(none)") {
        let mut parts = line.splitn(4, '\t');
        let (Some(mode), Some(owner), Some(group), Some(file)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            bail!("{}: unexpected rpm file list line {line:?}", path.display());
        };
        let mode = u32::from_str_radix(mode, 8)
            .with_context(|| format!("{}: file mode {mode:?}", path.display()))?;
        let Some(p) = member_path(Path::new(file))? else {
            continue;
        };
        entries.push(Entry {
            path: p,
            is_dir: mode & 0o170000 == 0o040000,
            mode: mode & 0o7777,
            owner: owner.to_string(),
            group: group.to_string(),
        });
    }
    let scripts = run(Command::new("rpm")
        .args(["-qp", "--nosignature", "--scripts", "--triggers"])
        .arg(path))?;
    Ok(PackageFacts {
        name: name.to_string(),
        version: version.to_string(),
        entries,
        scripts: String::from_utf8_lossy(&scripts).into_owned(),
        units: Vec::new(),
    })
}

/// rpm's database directory on this machine (`rpm -E %_dbpath`).
fn rpm_dbpath() -> Result<ScopePath> {
    let out = run(Command::new("rpm").args(["-E", "%_dbpath"]))?;
    let text = String::from_utf8(out).context("rpm output is not UTF-8")?;
    ScopePath::parse(text.trim()).with_context(|| format!("rpm's %_dbpath {:?}", text.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(path: &str, is_dir: bool) -> Entry {
        Entry {
            path: ScopePath::parse(path).unwrap(),
            is_dir,
            mode: if is_dir { 0o755 } else { 0o644 },
            owner: "root".into(),
            group: "root".into(),
        }
    }

    #[test]
    fn directories_are_parents_of_files_and_empty_directories() {
        let entries = vec![
            e("/etc", true),
            e("/etc/foo", true),
            e("/etc/foo/foo.conf", false),
            e("/usr", true),
            e("/usr/bin", true),
            e("/usr/bin/foo", false),
            e("/var", true),
            e("/var/lib", true),
            e("/var/lib/foo", true),
        ];
        let dirs: Vec<String> = package_dirs(&entries)
            .unwrap()
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(dirs, ["/etc/foo", "/usr/bin", "/var/lib/foo"]);
    }

    #[test]
    fn the_install_section_names_the_enablement_directories() {
        let unit = "[Unit]\nDescription=x\nWantedBy=ignored.target\n\n\
                    [Install]\n# WantedBy=commented.target\n\
                    WantedBy=multi-user.target  graphical.target\n\
                    RequiredBy=foo@bar.service\nUpheldBy=up.target\n\
                    Alias=web.service\nAlso=other.socket\n\
                    WantedBy=%i.target ../../etc.target /abs.target .hidden\n\
                    [Service]\nWantedBy=ignored-too.target\n";
        let install = parse_install(unit);
        let dirs: Vec<String> = install
            .enablement_dirs
            .iter()
            .map(|d| d.to_string())
            .collect();
        assert_eq!(
            dirs,
            [
                "/etc/systemd/system/foo@bar.service.requires",
                "/etc/systemd/system/graphical.target.wants",
                "/etc/systemd/system/multi-user.target.wants",
                "/etc/systemd/system/up.target.upholds",
            ]
        );
        assert_eq!(install.aliases, ["web.service"]);
        assert_eq!(
            install.unusable,
            [
                "WantedBy=%i.target",
                "WantedBy=../../etc.target",
                "WantedBy=/abs.target",
                "WantedBy=.hidden"
            ]
        );
        // Quotes, continuation lines, and never the agent's unit.
        let odd = parse_install(
            "[Install]\nWantedBy=\"multi-user.target\" \\\n  sockets.target\nRequiredBy=rollguard-agent.service\n",
        );
        let dirs: Vec<String> = odd.enablement_dirs.iter().map(|d| d.to_string()).collect();
        assert_eq!(
            dirs,
            [
                "/etc/systemd/system/multi-user.target.wants",
                "/etc/systemd/system/sockets.target.wants"
            ]
        );
        assert_eq!(odd.unusable, ["RequiredBy=rollguard-agent.service"]);
        // An empty assignment resets the list.
        let reset = parse_install("[Install]\nWantedBy=a.target\nWantedBy=\nWantedBy=b.target\n");
        let dirs: Vec<String> = reset
            .enablement_dirs
            .iter()
            .map(|d| d.to_string())
            .collect();
        assert_eq!(dirs, ["/etc/systemd/system/b.target.wants"]);
        assert_eq!(
            parse_install("[Service]\nExecStart=/bin/true\n"),
            InstallSection::default()
        );
    }

    #[test]
    fn a_private_package_directory_is_refused() {
        let mut private = e("/etc/foo", true);
        private.mode = 0o700;
        let entries = vec![private, e("/etc/foo/secret", false)];
        let err = package_dirs(&entries).unwrap_err().to_string();
        assert!(err.contains("0700"), "{err}");
    }
}
