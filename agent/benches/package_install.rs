//! Installing a 5 MB package through `rollguard-agent run`, measured against
//! a bare `dpkg -i` of the same file in the same run.
//!
//! ```sh
//! cargo build --release -p rollguard-cli --bin rollguard
//! sudo ROLLGUARD_BENCH_RUNS=21 cargo bench -p rollguard-agent --bench package_install
//! ```
//!
//! The bench builds the bundles with the `rollguard` CLI (`bundle build`
//! derives the scope from the package, `bundle sign`), found beside the
//! agent (`target/release/rollguard`, hence the first line; a stale one
//! builds a manifest the agent may refuse) or at `ROLLGUARD_CLI`.
//!
//! The package (`rgbench`, built with `dpkg-deb -Zxz`): 5 MiB of random
//! bytes (incompressible, so the size is real in the archive and on disk)
//! in four files in `/usr/share/rgbench/`, a README there, a conffile
//! `/etc/rgbench/rgbench.conf` and a trivial postinst (`exit 0`): one
//! maintainer script, as most packages have. Version 1.0 is installed bare
//! once, then the same .deb is reinstalled, alternately (A B B A ...):
//!
//! - bare: `setsid --wait dpkg --admindir=/var/lib/dpkg
//!   --log=/var/log/dpkg.log --force-confdef --force-confold --no-triggers
//!   --install FILE` with `DEBIAN_FRONTEND=noninteractive`: exactly the agent's dpkg
//!   command line, in a session of its own as the sandbox puts the bundle
//!   (with autogroup scheduling a session is a CPU scheduling group);
//! - sandboxed: `rollguard-agent run --policy P BUNDLE` of a signed bundle
//!   with `[packages] install = [that .deb]`: verification, unpacking the
//!   payload into the state directory, the database snapshot, the sandbox
//!   (Landlock, seccomp, namespaces, cgroup, audit collection), the same
//!   dpkg inside it, the database read afterwards and the stale-services
//!   scan. Each run needs a newer bundle version (rollback protection):
//!   bundles 1..=RUNS+1 are built and signed beforehand.
//!
//! Twice: with the agent's state directory on the disk (the real
//! configuration), and on a tmpfs, which takes the agent's own durable
//! writes and the payload's trip through the disk out of the figure.
//!
//! With the state on the disk, each round also runs a trivial bundle
//! (`#!/bin/sh` then `true`, declaring the package bundle's derived scope
//! as its write scope) through the same agent and policy, and that script
//! bare: the fixed cost of any confined run (verification, cgroup,
//! namespaces, Landlock, seccomp, audit, the durable records), measured
//! in the same rounds as the install, so that the install's own share of
//! the added latency (package's added minus trivial's added, per round)
//! is not a difference between two runs on a machine whose speed moves.
//! Its bare side also installs the package bare once more while the run's
//! audit syscall-exit rules exist (`kernel_audit::exit_rules`, for an audit
//! session nobody has): while any such rule exists, every system call on
//! the host takes audit's slow path, so this is what observing the
//! read-only mounts' refusals costs dpkg's own system calls (about 8,500
//! per install here), with nothing else of the sandbox around it.
//!
//! dpkg itself writes to the real root: `/usr/share/rgbench`,
//! `/etc/rgbench` and `/var/lib/dpkg` on this machine's disk, on both
//! sides, and fsyncs the database files (about 30 fsyncs per install
//! here) and, unless `force-unsafe-io` is set, each unpacked file, so the
//! disk's flush latency is part of both sides. Both sides run with the same
//! dpkg options: the agent passes no `--force-unsafe-io`, so neither does
//! the bare side, and both read the same `/etc/dpkg/dpkg.cfg.d/` (container
//! images often set `force-unsafe-io` there; the header says what this
//! machine's configuration sets). `ROLLGUARD_BENCH_DPKG_IO=safe` (or
//! `unsafe`) writes `refuse-unsafe-io` (or `force-unsafe-io`) into
//! `/etc/dpkg/dpkg.cfg.d/` for the bench's duration, after the other files
//! there in name order, so it overrides their setting on both sides alike (and for every other
//! dpkg on the machine meanwhile). The bundles, the .deb and the keys live
//! on a tmpfs mounted for the bench.
//!
//! Reported: median [min .. max] of each side's wall-clock time, the
//! median and the range of the per-pair ratios sandboxed/bare, and the CPU
//! time (user + system) of each side's whole process tree (the agent,
//! stage 2, dpkg and the programs it runs; or dpkg and those), with its
//! per-pair ratios: on a machine shared with other work the wall clock
//! swings with CPU contention, CPU time does not count waiting for a core.
//! Every sandboxed run must succeed; the denials they report are listed at
//! the end (a rollout halts on them; here they are shown, not judged).
//! No thresholds: this prints figures, it does not judge them. Needs root,
//! like the agent, and a free dpkg lock (nothing else running dpkg). The
//! package is purged and the bench's trees removed at the end (also on a
//! panic). Test trees stay out of /tmp and /var/tmp, which the sandbox
//! replaces with private scratch.

mod common;

use common::{children_cpu, ms, stat, timed, Pairs, Sample};
use rollguard_agent::kernel_audit::exit_rules;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const BASE: &str = "/var/lib/rollguard-bench-packages";
const NAME: &str = "rgbench";
const VERSION: &str = "1.0";
/// The payload: this many files of this many random bytes (5 MiB).
const DATA_FILES: usize = 4;
const DATA_FILE_BYTES: usize = 5 * 1024 * 1024 / DATA_FILES;
/// The audit session the bare install's audit rules name: none of the
/// machine's (sessions count up from 1 and this is the last valid one), so
/// the rules report nothing and cost what any run's rules cost everyone.
const UNUSED_AUDIT_SESSION: u32 = u32::MAX - 1;
const DPKG_CFG: &str = "/etc/dpkg/dpkg.cfg.d/zz-rollguard-bench";
/// The agent's dpkg command line (agent/src/packages/mod.rs), less the
/// files.
const DPKG: &[&str] = &[
    "/usr/bin/dpkg",
    "--admindir=/var/lib/dpkg",
    "--log=/var/log/dpkg.log",
    "--force-confdef",
    "--force-confold",
    "--no-triggers",
    "--install",
];

/// Everything the bench changes on the machine, undone on drop (also when
/// a run panics): the package purged, its directories, the dpkg setting,
/// the tmpfs mounts and the bench's tree removed.
struct Cleanup {
    mounts: Vec<PathBuf>,
}

impl Cleanup {
    fn new() -> Cleanup {
        let c = Cleanup { mounts: vec![] };
        c.purge();
        for m in [
            Path::new(BASE).join("scratch"),
            Path::new(BASE).join("state-tmpfs"),
        ] {
            let _ = Command::new("umount").arg(m).stderr(Stdio::null()).status();
        }
        let _ = fs::remove_dir_all(BASE);
        c
    }

    fn purge(&self) {
        let _ = fs::remove_file(DPKG_CFG);
        let _ = Command::new("dpkg")
            .args(["--purge", NAME])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(format!("/usr/share/{NAME}"));
        let _ = fs::remove_dir_all(format!("/etc/{NAME}"));
    }

    /// A tmpfs on `path`, unmounted on drop.
    fn tmpfs(&mut self, path: PathBuf) -> PathBuf {
        fs::create_dir_all(&path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "mode=0700,size=1g", "tmpfs"])
            .arg(&path)
            .status()
            .expect("mount(8)");
        assert!(
            status.success(),
            "cannot mount a tmpfs on {}",
            path.display()
        );
        self.mounts.push(path.clone());
        path
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.purge();
        for m in self.mounts.drain(..).rev() {
            let _ = Command::new("umount").arg(m).status();
        }
        let _ = fs::remove_dir_all(BASE);
    }
}

fn main() {
    let runs: usize = std::env::var("ROLLGUARD_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(9);
    let dpkg_io = match std::env::var("ROLLGUARD_BENCH_DPKG_IO").ok().as_deref() {
        None | Some("") => None,
        Some("safe") => Some("refuse-unsafe-io"),
        Some("unsafe") => Some("force-unsafe-io"),
        Some(other) => panic!("ROLLGUARD_BENCH_DPKG_IO={other}: `safe` or `unsafe`"),
    };
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_rollguard-agent"));
    let cli = std::env::var_os("ROLLGUARD_CLI")
        .map(PathBuf::from)
        .unwrap_or_else(|| agent.with_file_name("rollguard"));
    assert!(
        cli.is_file(),
        "{} is missing: `cargo build --release -p rollguard-cli --bin rollguard` first (or set ROLLGUARD_CLI)",
        cli.display()
    );

    let mut cleanup = Cleanup::new();
    let base = Path::new(BASE);
    fs::create_dir_all(base).unwrap();
    let scratch = cleanup.tmpfs(base.join("scratch"));
    let state_tmpfs = cleanup.tmpfs(base.join("state-tmpfs"));
    if let Some(setting) = dpkg_io {
        fs::write(DPKG_CFG, format!("{setting}\n")).unwrap();
    }

    // Keys, trust and policies (state on the disk, state on a tmpfs).
    let key = scratch.join("key");
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen (openssh-client) is needed");
    assert!(status.success());
    let public = fs::read_to_string(key.with_extension("pub")).unwrap();
    let mut f = public.split_whitespace();
    let allowed_signers = scratch.join("allowed_signers");
    fs::write(
        &allowed_signers,
        format!("bench {} {}\n", f.next().unwrap(), f.next().unwrap()),
    )
    .unwrap();
    fs::create_dir_all(base.join("backup")).unwrap();
    let write_policy = |file: &str, state: PathBuf| {
        let path = scratch.join(file);
        fs::write(
            &path,
            format!(
                "[host]\nname = \"bench-01\"\n[trust]\nallowed_signers = {allowed_signers:?}\nthreshold = 1\ndelete_threshold = 1\n[protect]\npaths = [{:?}]\n[limits]\nallow_scopes = {}\n[state]\ndir = {state:?}\n",
                base.join("backup"),
                scope(),
            ),
        )
        .unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        path
    };
    let policy_disk = write_policy("agent-disk.toml", base.join("state"));
    let policy_tmpfs = write_policy("agent-tmpfs.toml", state_tmpfs.join("state"));

    let deb = build_deb(&scratch);
    let deb_size = fs::metadata(&deb).unwrap().len();
    assert!(
        deb_size >= (DATA_FILES * DATA_FILE_BYTES) as u64,
        "the .deb compressed the random data: {deb_size} bytes"
    );
    let bundles = build_bundles(&cli, &scratch, &key, &deb, runs + 1);
    let trivial_bundles = build_trivial_bundles(&cli, &scratch, &key, runs + 1);
    let trivial_script = scratch.join("trivial.sh");
    fs::write(&trivial_script, TRIVIAL_SCRIPT).unwrap();
    fs::set_permissions(&trivial_script, fs::Permissions::from_mode(0o755)).unwrap();

    let denials = std::cell::RefCell::new(Vec::<String>::new());
    let sandboxed = |policy: &Path, bundle: &Path| {
        let cpu = children_cpu();
        let t = Instant::now();
        let out = Command::new(&agent)
            .arg("run")
            .arg("--policy")
            .arg(policy)
            .arg(bundle)
            .arg("--json")
            .stderr(Stdio::null())
            .output()
            .unwrap();
        let sample = Sample {
            wall: t.elapsed(),
            cpu: children_cpu() - cpu,
        };
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report");
        assert_eq!(report["status"], "succeeded", "{report:#}");
        // Shown, not judged: a denial halts a rollout, but the install
        // itself succeeded, and its cost is what is measured here.
        for d in report["denials"].as_array().into_iter().flatten() {
            let d = format!("{} by {}", d["access"], d["exe"]);
            let mut seen = denials.borrow_mut();
            if !seen.contains(&d) {
                seen.push(d);
            }
        }
        sample
    };
    let bare = || {
        let cpu = children_cpu();
        let t = Instant::now();
        let out = Command::new("setsid")
            .arg("--wait")
            .args(DPKG)
            .arg(&deb)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let sample = Sample {
            wall: t.elapsed(),
            cpu: children_cpu() - cpu,
        };
        assert!(
            out.status.success(),
            "dpkg -i: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        sample
    };

    let bare_trivial = || timed(&mut Command::new(&trivial_script));
    // The bare install while the run's audit syscall-exit rules exist (for
    // an audit session no process has): while any such rule exists, every
    // system call on the host takes audit's slow path, dpkg's included.
    // Removing them waits for an RCU grace period: outside the timed part.
    let bare_audited = || {
        exit_rules::install(UNUSED_AUDIT_SESSION).expect("adding the audit rules");
        let sample = bare();
        exit_rules::remove(UNUSED_AUDIT_SESSION).expect("removing the audit rules");
        sample
    };

    // v1 installed bare once (not counted), then one warm-up of each kind
    // (page cache, first-run effects), not counted either.
    bare();
    bare();
    sandboxed(&policy_disk, &bundles[0]);
    sandboxed(&policy_tmpfs, &bundles[0]);
    sandboxed(&policy_disk, &trivial_bundles[0]);
    bare_trivial();
    bare_audited();

    // Each round's trivial pair runs right after its package pair, and
    // the bare install under the audit rules beside the bare one.
    let trivial = std::cell::RefCell::new(Pairs {
        sandboxed: vec![],
        bare: vec![],
    });
    let audited = std::cell::RefCell::new(Pairs {
        sandboxed: vec![],
        bare: vec![],
    });
    let disk = Pairs::measure(
        runs,
        |i| {
            let s = sandboxed(&policy_disk, &bundles[i]);
            let t = sandboxed(&policy_disk, &trivial_bundles[i]);
            trivial.borrow_mut().sandboxed.push(t);
            s
        },
        |i| {
            // Alternately first, as the pairs are.
            let (b, a) = if i % 2 == 0 {
                let a = bare_audited();
                (bare(), a)
            } else {
                (bare(), bare_audited())
            };
            let t = bare_trivial();
            trivial.borrow_mut().bare.push(t);
            let mut audited = audited.borrow_mut();
            audited.sandboxed.push(a);
            audited.bare.push(b);
            b
        },
    );
    let trivial = trivial.into_inner();
    let audited = audited.into_inner();
    let tmpfs = Pairs::measure(runs, |i| sandboxed(&policy_tmpfs, &bundles[i]), |_| bare());

    let wall = |s: &Sample| s.wall;
    let cpu = |s: &Sample| s.cpu;
    println!(
        "package install ({NAME} {VERSION}, .deb of {:.2} MB, {} files), {runs} interleaved pairs each: median [min .. max]",
        deb_size as f64 / 1e6,
        DATA_FILES + 2,
    );
    println!(
        "dpkg options: the agent's on both sides, no --force-unsafe-io; configuration: {}",
        dpkg_unsafe_io_setting()
    );
    for (label, p) in [("state on disk", &disk), ("state on tmpfs", &tmpfs)] {
        println!("agent {label}");
        row("bare dpkg -i, wall clock", ms(&Pairs::wall(&p.bare)));
        row(
            "rollguard-agent run, wall clock",
            ms(&Pairs::wall(&p.sandboxed)),
        );
        row(
            "ratio sandboxed/bare, wall, per pair",
            stat(&p.ratios(wall), ""),
        );
        row("added latency, per pair", stat(&p.differences_ms(), " ms"));
        row("bare dpkg -i, CPU time (tree)", ms(&Pairs::cpu(&p.bare)));
        row(
            "rollguard-agent run, CPU time (tree)",
            ms(&Pairs::cpu(&p.sandboxed)),
        );
        row(
            "ratio sandboxed/bare, CPU, per pair",
            stat(&p.ratios(cpu), ""),
        );
    }
    println!("the same rounds (state on disk): a trivial bundle (`true`, the package's scope)");
    row(
        "rollguard-agent run, wall clock",
        ms(&Pairs::wall(&trivial.sandboxed)),
    );
    row(
        "added latency (fixed cost), per round",
        stat(&trivial.differences_ms(), " ms"),
    );
    row(
        "rollguard-agent run, CPU time (tree)",
        ms(&Pairs::cpu(&trivial.sandboxed)),
    );
    let own: Vec<f64> = disk
        .differences_ms()
        .iter()
        .zip(trivial.differences_ms())
        .map(|(package, fixed)| package - fixed)
        .collect();
    row("the install's own share, per round", stat(&own, " ms"));
    println!("    (the package's added latency minus the trivial bundle's)");
    println!("the same rounds: the bare install while the run's audit exit rules exist");
    row(
        "bare dpkg -i, wall clock",
        ms(&Pairs::wall(&audited.sandboxed)),
    );
    row(
        "audit's slow path on it, per round",
        stat(&audited.differences_ms(), " ms"),
    );
    row(
        "bare dpkg -i, CPU time (tree)",
        ms(&Pairs::cpu(&audited.sandboxed)),
    );
    row(
        "ratio to bare, CPU, per round",
        stat(&audited.ratios(cpu), ""),
    );
    let denials = denials.borrow();
    if !denials.is_empty() {
        println!("denials reported by the sandboxed runs (each would halt a rollout):");
        for d in denials.iter() {
            println!("  {d}");
        }
    }
    drop(cleanup);
}

/// What dpkg's configuration files say about `unsafe-io` (dpkg reads
/// `/etc/dpkg/dpkg.cfg.d/*` in name order, then `/etc/dpkg/dpkg.cfg`; the
/// last setting wins).
fn dpkg_unsafe_io_setting() -> String {
    let mut files: Vec<PathBuf> = fs::read_dir("/etc/dpkg/dpkg.cfg.d")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            })
        })
        .collect();
    files.sort();
    files.push(PathBuf::from("/etc/dpkg/dpkg.cfg"));
    let mut setting = "none (dpkg fsyncs each unpacked file)".to_string();
    for file in files {
        for line in fs::read_to_string(&file).unwrap_or_default().lines() {
            let line = line.trim();
            if line == "force-unsafe-io"
                || line == "refuse-unsafe-io"
                || line == "no-force-unsafe-io"
            {
                setting = format!("{line} in {}", file.display());
            }
        }
    }
    setting
}

/// Deterministic incompressible bytes (xorshift64*): no dependency, and
/// neither xz nor gzip finds anything to compress. Distinct seeds give
/// distinct files (xz would find a repeated file).
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `rgbench_1.0_all.deb` in `out`.
fn build_deb(out: &Path) -> PathBuf {
    let root = out.join("deb-tree");
    let write = |rel: &str, bytes: &[u8], mode: u32| {
        let p = root.join(rel.trim_start_matches('/'));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, bytes).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    };
    write(
        "DEBIAN/control",
        format!("Package: {NAME}\nVersion: {VERSION}\nArchitecture: all\nMaintainer: rollguard bench <bench@example.invalid>\nDescription: rollguard package-install bench\n").as_bytes(),
        0o644,
    );
    write(
        "DEBIAN/conffiles",
        format!("/etc/{NAME}/{NAME}.conf\n").as_bytes(),
        0o644,
    );
    write("DEBIAN/postinst", b"#!/bin/sh\nset -e\nexit 0\n", 0o755);
    write(&format!("/etc/{NAME}/{NAME}.conf"), b"setting = 1\n", 0o644);
    write(&format!("/usr/share/{NAME}/README"), b"bench data\n", 0o644);
    for i in 0..DATA_FILES {
        write(
            &format!("/usr/share/{NAME}/data-{i}.bin"),
            &random_bytes(
                DATA_FILE_BYTES,
                (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            ),
            0o644,
        );
    }
    for dir in ["", "etc", "usr", "usr/share"]
        .iter()
        .map(|d| root.join(d))
        .chain([
            root.join("etc").join(NAME),
            root.join("usr/share").join(NAME),
        ])
    {
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let deb = out.join(format!("{NAME}_{VERSION}_all.deb"));
    run_ok(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&root)
            .arg(&deb),
    );
    deb
}

/// Signed bundles with versions 1..=count, each installing `deb`, built and
/// signed with the `rollguard` CLI (the scope derived as in production).
fn build_bundles(cli: &Path, out: &Path, key: &Path, deb: &Path, count: usize) -> Vec<PathBuf> {
    let src = out.join("bundle-src");
    fs::create_dir_all(src.join("pkgs")).unwrap();
    let file = deb.file_name().unwrap().to_str().unwrap();
    fs::copy(deb, src.join("pkgs").join(file)).unwrap();
    (1..=count)
        .map(|v| {
            fs::write(
                src.join("bundle.toml"),
                format!(
                    "[bundle]\nname = \"bench-packages\"\nversion = {v}\ndescription = \"install the bench package\"\nexpires = 2099-01-01T00:00:00Z\n[targets]\nhosts = [\"bench-*\"]\n[packages]\ninstall = [\"pkgs/{file}\"]\n[run]\ntimeout = \"5m\"\n"
                ),
            )
            .unwrap();
            let bundle = out.join(format!("packages-{v}.bundle"));
            sign_built(cli, &src, &bundle, key);
            bundle
        })
        .collect()
}

/// What `bundle build` derives as the package's write scope, as a TOML
/// array: the policy's ceiling, and the trivial bundle's declared scope.
fn scope() -> String {
    format!("[\"/etc/{NAME}\", \"/usr/share/{NAME}\", \"/var/lib/dpkg\", \"/var/log/dpkg.log\"]")
}

/// The trivial bundle's command, and the bare side's script.
const TRIVIAL_SCRIPT: &str = "#!/bin/sh\ntrue\n";

/// Signed trivial bundles with versions 1..=count (`run.sh`:
/// [`TRIVIAL_SCRIPT`]), declaring as their write scope what `bundle build`
/// derives for the package, so that stage 2 confines them the same way.
fn build_trivial_bundles(cli: &Path, out: &Path, key: &Path, count: usize) -> Vec<PathBuf> {
    let src = out.join("trivial-src");
    fs::create_dir_all(&src).unwrap();
    let run = src.join("run.sh");
    fs::write(&run, TRIVIAL_SCRIPT).unwrap();
    fs::set_permissions(&run, fs::Permissions::from_mode(0o755)).unwrap();
    (1..=count)
        .map(|v| {
            fs::write(
                src.join("bundle.toml"),
                format!(
                    "[bundle]\nname = \"bench-trivial\"\nversion = {v}\ndescription = \"the fixed cost\"\nexpires = 2099-01-01T00:00:00Z\n[targets]\nhosts = [\"bench-*\"]\n[scope]\nwrite = {}\n[run]\ncommand = [\"./run.sh\"]\ntimeout = \"5m\"\n",
                    scope()
                ),
            )
            .unwrap();
            let bundle = out.join(format!("trivial-{v}.bundle"));
            sign_built(cli, &src, &bundle, key);
            bundle
        })
        .collect()
}

/// `rollguard bundle build SRC -o BUNDLE`, then `bundle sign`.
fn sign_built(cli: &Path, src: &Path, bundle: &Path, key: &Path) {
    run_ok(
        Command::new(cli)
            .args(["bundle", "build"])
            .arg(src)
            .arg("-o")
            .arg(bundle),
    );
    run_ok(
        Command::new(cli)
            .args(["bundle", "sign"])
            .arg(bundle)
            .arg("--key")
            .arg(key)
            .args(["--signer", "bench"]),
    );
}

/// One figure of the report: its label, padded, then the value.
fn row(label: &str, value: String) {
    println!("  {label:<38} {value}");
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
