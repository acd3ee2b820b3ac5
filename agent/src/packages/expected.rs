//! The denials a package install causes without trying anything, and how
//! they are recognised. Each is a refused call that could not have changed
//! anything even if allowed, made by the package manager's own programs.
//! They are moved from the report's `denials` to `expected_denials` (with
//! this reason), so a correct install does not halt a rollout, and stay
//! visible there. Anything else, and anything a maintainer script does, is
//! reported as a denial.
//!
//! Both have a cause we cannot remove from outside the programs:
//!
//! - [`GLIBC_NSCD_PROBE`]: glibc's user and group lookups (dpkg and tar
//!   map the archive's owner names, rpm likewise) first try the nscd
//!   daemon by creating an `AF_UNIX` socket; no environment variable or
//!   configuration turns that off (only nscd itself can, in-process). The
//!   sandbox's seccomp filter refuses every `AF_UNIX` socket, so the probe
//!   is refused and glibc falls back to `/etc/passwd`. Recognised: a
//!   `syscall.socket` denial by dpkg, dpkg-deb, tar or rpm. The same call
//!   from any other program stays a denial. The record names the program
//!   file, not its parent nor the code in it: these programs started by a
//!   maintainer script, or a script's own code preloaded into them or put
//!   in their place, are not told apart; such a refused `socket()` (of any
//!   family: the record has no arguments) is listed as expected, not as a
//!   denial (docs/bundle-format.md, "The limit of that recognition").
//! - [`DPKG_NEW_CLEANUP`]: for each directory in the archive dpkg removes a
//!   stale `DIR/.dpkg-new` left by an interrupted run (`rmdir`, result
//!   ignored when absent). Outside the write scope the read-only mount
//!   answers `EROFS` before the name is even looked up, so the call is
//!   recorded although nothing was there. Recognised: an `erofs.rmdir` by
//!   dpkg whose directory is a proper ancestor of one of the derived
//!   package directories (`/`, `/usr`, `/usr/lib` for `/usr/lib/foo`)
//!   and lies outside the write scope. The record names the directory, not
//!   the entry: another `rmdir` by dpkg there (a script's own dpkg, with an
//!   admin directory of its own) is not told apart, refused all the same.
//!   Inside the scope only the agent's pins are read-only, and they hold
//!   no package's directory, so an `EROFS` there came through a pin or a
//!   link the run made, and stays a denial.
//! - [`DSH_MASKED_CLEANUP`]: `deb-systemd-helper unmask`, which debhelper's
//!   postinst snippet runs on every configure of a service package, then
//!   removes its masked-state directories if empty
//!   (`/var/lib/systemd/deb-systemd-helper-masked` and the user one),
//!   which are usually absent. `/var/lib/systemd` lies outside the derived
//!   scope (only its `deb-systemd-helper-enabled` is in it), so the
//!   read-only mount answers `EROFS` before the name is looked up, and the
//!   call is recorded. Recognised: an `erofs.rmdir` by `/usr/bin/perl` (the
//!   helper's interpreter) in exactly `/var/lib/systemd/`, when the derived
//!   scope holds the helper's state directory (the packages' scripts call
//!   it). The audit record names the directory only, not the entry: a
//!   maintainer script's own perl removing another empty directory there
//!   is not told apart, and is refused all the same.

use std::path::Path;

use rollguard_shared::manifest::packages::DEB_SYSTEMD_HELPER_STATE;
use rollguard_shared::manifest::{PackageKind, Packages};
use rollguard_shared::report::Denial;

pub const GLIBC_NSCD_PROBE: &str = "glibc-nscd-probe";
pub const DPKG_NEW_CLEANUP: &str = "dpkg-new-cleanup";
pub const DSH_MASKED_CLEANUP: &str = "deb-systemd-helper-cleanup";

/// The package manager's programs whose nscd probe is expected.
const DEB_PROGRAMS: &[&str] = &["/usr/bin/dpkg", "/usr/bin/dpkg-deb", "/usr/bin/tar"];
const RPM_PROGRAMS: &[&str] = &["/usr/bin/rpm"];
const DPKG: &str = "/usr/bin/dpkg";
/// `deb-systemd-helper`'s interpreter (`#!/usr/bin/perl`).
const PERL: &str = "/usr/bin/perl";
/// The directory `deb-systemd-helper unmask` removes its state from.
const SYSTEMD_STATE: &str = "/var/lib/systemd/";

/// Recognise an expected denial of an install of `p`.
pub fn explain(p: &Packages, d: &Denial) -> Option<&'static str> {
    let exe = d.exe.as_deref()?;
    let programs = match p.kind {
        PackageKind::Deb => DEB_PROGRAMS,
        PackageKind::Rpm => RPM_PROGRAMS,
    };
    if d.access == "syscall.socket" && d.path.is_none() && programs.contains(&exe) {
        return Some(GLIBC_NSCD_PROBE);
    }
    if p.kind == PackageKind::Deb && d.access == "erofs.rmdir" && exe == DPKG {
        let dir = d.path.as_deref()?;
        let trimmed = dir.trim_end_matches('/');
        let dir = Path::new(if trimmed.is_empty() { "/" } else { trimmed });
        // `/lib/` on a merged-/usr host is `/usr/lib`, as the scope is.
        let real = super::merged_usr(dir);
        let dir = real.as_deref().unwrap_or(dir);
        let holds_a_package_dir = p
            .write
            .iter()
            .filter(|w| {
                w.as_path() != p.database.as_path() && w.as_path() != Path::new(super::DPKG_LOG)
            })
            .any(|w| w.as_path() != dir && w.as_path().starts_with(dir));
        // Only outside the write scope does a read-only mount answer. A
        // directory inside it that answers EROFS was reached another way
        // (a symlink the run made there, or a pinned path): not dpkg's
        // cleanup, whatever names it.
        let in_scope = p.write.iter().any(|w| dir.starts_with(w.as_path()));
        if holds_a_package_dir && !in_scope {
            return Some(DPKG_NEW_CLEANUP);
        }
    }
    let helper_state = p
        .write
        .iter()
        .any(|w| w.as_path() == Path::new(DEB_SYSTEMD_HELPER_STATE));
    if p.kind == PackageKind::Deb
        && d.access == "erofs.rmdir"
        && exe == PERL
        && d.path.as_deref() == Some(SYSTEMD_STATE)
        && helper_state
    {
        return Some(DSH_MASKED_CLEANUP);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use rollguard_shared::manifest::packages::PackageToken;
    use rollguard_shared::manifest::{DerivedPackage, PayloadPath};
    use rollguard_shared::ScopePath;

    fn deb() -> Packages {
        Packages {
            kind: PackageKind::Deb,
            install: vec![DerivedPackage {
                file: PayloadPath::parse("a.deb").unwrap(),
                name: PackageToken::parse("a").unwrap(),
                version: PackageToken::parse("1").unwrap(),
            }],
            database: ScopePath::parse("/var/lib/dpkg").unwrap(),
            write: ["/etc/a", "/usr/lib/a", "/usr/lib/a/s/t", "/var/lib/dpkg"]
                .iter()
                .map(|p| ScopePath::parse(p).unwrap())
                .collect(),
            delete: vec![],
        }
    }

    fn denial(access: &str, path: Option<&str>, exe: &str) -> Denial {
        Denial {
            access: access.into(),
            path: path.map(str::to_string),
            exe: Some(exe.into()),
        }
    }

    #[test]
    fn only_the_narrow_cases_are_expected() {
        let p = deb();
        let yes = [
            denial("syscall.socket", None, "/usr/bin/dpkg"),
            denial("syscall.socket", None, "/usr/bin/tar"),
            denial("erofs.rmdir", Some("/"), "/usr/bin/dpkg"),
            denial("erofs.rmdir", Some("/usr/"), "/usr/bin/dpkg"),
            denial("erofs.rmdir", Some("/usr/lib/"), "/usr/bin/dpkg"),
        ];
        for d in &yes {
            assert!(explain(&p, d).is_some(), "{d:?}");
        }
        let no = [
            // A maintainer script's own programs.
            denial("syscall.socket", None, "/usr/bin/python3"),
            denial("syscall.connect", None, "/usr/bin/dpkg"),
            // Not an ancestor of a package directory.
            denial("erofs.rmdir", Some("/srv/"), "/usr/bin/dpkg"),
            // An ancestor of one package directory inside another, or
            // inside it: in the scope, no read-only mount answers, so the
            // path led elsewhere (a symlink the run made).
            denial("erofs.rmdir", Some("/usr/lib/a/s/"), "/usr/bin/dpkg"),
            denial("erofs.rmdir", Some("/usr/lib/a/"), "/usr/bin/dpkg"),
            // The database's ancestors do not count.
            denial("erofs.rmdir", Some("/var/lib/"), "/usr/bin/dpkg"),
            denial("erofs.unlinkat", Some("/usr/"), "/usr/bin/dpkg"),
            denial("erofs.rmdir", Some("/usr/"), "/bin/rm"),
            denial("fs.remove_dir", Some("/usr/"), "/usr/bin/dpkg"),
        ];
        for d in &no {
            assert!(explain(&p, d).is_none(), "{d:?}");
        }
    }

    #[test]
    fn the_helpers_masked_state_cleanup_is_expected_only_with_its_state_in_scope() {
        let cleanup = denial("erofs.rmdir", Some("/var/lib/systemd/"), "/usr/bin/perl");
        let mut p = deb();
        assert_eq!(explain(&p, &cleanup), None, "the scripts do not call it");
        p.write
            .push(ScopePath::parse(DEB_SYSTEMD_HELPER_STATE).unwrap());
        assert_eq!(explain(&p, &cleanup), Some(DSH_MASKED_CLEANUP));
        for other in [
            denial("erofs.rmdir", Some("/var/lib/"), "/usr/bin/perl"),
            denial(
                "erofs.rmdir",
                Some("/var/lib/systemd/timers/"),
                "/usr/bin/perl",
            ),
            denial("erofs.unlink", Some("/var/lib/systemd/"), "/usr/bin/perl"),
            denial("erofs.rmdir", Some("/var/lib/systemd/"), "/bin/rm"),
            denial("fs.remove_dir", Some("/var/lib/systemd/"), "/usr/bin/perl"),
        ] {
            assert_eq!(explain(&p, &other), None, "{other:?}");
        }
    }
}
