//! Sandbox overhead, measured against a bare baseline in the same run.
//!
//! ```sh
//! sudo ROLLGUARD_BENCH_RUNS=9 cargo bench -p rollguard-agent --bench sandbox_overhead
//! ```
//!
//! 1. A create-and-delete-20k-files workload (one python3 process) run bare
//!    vs as a bundle through `rollguard-agent run` (verification, unpack,
//!    Landlock, seccomp, namespaces, cgroup, audit collection included).
//!    The files live on a tmpfs mounted for the bench at
//!    `/var/lib/rollguard-bench/work`: on a disk the figure is dominated by
//!    writeback of 20k inodes (bimodal run to run on the CI machines' ext4,
//!    0.3x-3x), which says nothing about the sandbox; on tmpfs every run
//!    does the same work, so the ratio is the cost the sandbox adds to file
//!    system syscalls (Landlock path checks on each create/unlink, the
//!    seccomp filter on each syscall) plus the fixed cost of a run.
//!    `ROLLGUARD_BENCH_WORK_ON_DISK=1` runs it on the disk instead. Both
//!    sides run `/usr/bin/python3` in a session of their own (see below).
//!    Wall-clock time on a machine shared with other work swings with CPU
//!    contention (0.5-1.7 s for the same 0.55 s of CPU), so the CPU time
//!    (user + system) of each side's whole process tree is reported too:
//!    the sandbox's cost is CPU work (in-kernel Landlock checks, the seccomp
//!    filter, the agent itself), and CPU time does not count time spent
//!    waiting for a core.
//! 2. A trivial bundle (`/bin/true`-like script) through `rollguard-agent
//!    run` vs running its script directly: the added latency, twice: with
//!    the state directory on the disk (the real configuration: three
//!    durable writes, each waiting for the disk to flush), and with it on a
//!    tmpfs, where a flush is free, which isolates what the agent and the
//!    kernel mechanisms cost from the disk's flush latency. The flush
//!    latency itself (a durable replace: write, fsync, rename, fsync the
//!    directory) is printed too.
//!
//! 3. The same 20k-file workload as a preview (`run --preview`: every
//!    scope an overlay on a private tmpfs, nothing reaches the disk) vs
//!    the same bundle run for real, both through `rollguard-agent run`:
//!    the cost of the preview layers (their set-up, the copy into the
//!    upper layer, reading the changes afterwards). The preview always
//!    runs the newest bundle (a preview uses no version up); each real
//!    run uses one of its older versions.
//!
//! 4. Where the 20k-file ratio goes: the same workload under each per-syscall
//!    mechanism alone, with none of the rest of a run (no agent, no
//!    namespaces, no cgroup): the bench re-executes itself, applies the
//!    run's Landlock rules (`landlock_rules::restrict_self`, the same spec
//!    as the bundle's), its seccomp filters, the run's audit syscall-exit
//!    rules for an audit session of its own (`kernel_audit::exit_rules`,
//!    which report the read-only mounts' `EROFS`), or combinations, then
//!    execs the same python. Ratios are against "neither" (same re-exec
//!    path), so they are the cost of the checks on each create/open/unlink
//!    alone; "all" is the three together. "overlay" is a preview's overlay
//!    alone (the same options, its upper layer on a tmpfs, in a mount
//!    namespace of the child's own): what 3. pays per create and unlink.
//!
//! Runs are interleaved, alternating which side goes first (A B B A ...),
//! so drift in machine speed hits both sides alike. Reported: median [min
//! .. max] of each side, and the median and the best of the per-pair
//! ratios/differences. No thresholds: this prints figures, it does not
//! judge them. Needs root, like the agent. Test trees stay out of /tmp and
//! /var/tmp, which the sandbox replaces with private scratch.

mod common;

use common::{children_cpu, ms, stat, timed, Pairs, Sample};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rollguard_shared::archive::{self, BuildOptions, Limits, StoredSignature};
use rollguard_shared::signature;

const BASE: &str = "/var/lib/rollguard-bench";
const FILES: u32 = 20_000;
/// The same interpreter on both sides: a `python3` found through the
/// bench's own PATH (a pyenv shim, say) would be a different program, with
/// a different start-up cost, from the one the bundle finds on the
/// sandbox's standard PATH.
const PYTHON: &str = "/usr/bin/python3";

/// A tmpfs mounted for the bench, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: PathBuf) -> Tmpfs {
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
        Tmpfs(path)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// First argument of the bench re-executed as an ablation child (see 4.).
const CONFINE_ONLY: &str = "__confine-only";

/// Which per-syscall mechanisms an ablation child applies.
#[derive(Clone, Copy, PartialEq)]
enum Mechanisms {
    Neither,
    Landlock,
    Seccomp,
    Both,
    /// The run's audit syscall-exit rules (`kernel_audit::exit_rules`),
    /// added for the child's own audit session: while any such rule
    /// exists, every system call takes audit's slow path.
    Audit,
    /// Landlock, seccomp and the audit rules together.
    All,
    /// A preview's overlay (`preview_layers`, same options) over the work
    /// directory, its upper layer on a tmpfs: what a preview adds to every
    /// create and unlink, without the rest of a preview run.
    Overlay,
}

impl Mechanisms {
    const ALL: [Mechanisms; 7] = [
        Mechanisms::Neither,
        Mechanisms::Landlock,
        Mechanisms::Seccomp,
        Mechanisms::Both,
        Mechanisms::Audit,
        Mechanisms::All,
        Mechanisms::Overlay,
    ];

    fn name(self) -> &'static str {
        match self {
            Mechanisms::Neither => "neither",
            Mechanisms::Landlock => "landlock",
            Mechanisms::Seccomp => "seccomp",
            Mechanisms::Both => "both",
            Mechanisms::Audit => "audit",
            Mechanisms::All => "all",
            Mechanisms::Overlay => "overlay",
        }
    }

    fn landlock(self) -> bool {
        matches!(
            self,
            Mechanisms::Landlock | Mechanisms::Both | Mechanisms::All
        )
    }

    fn seccomp(self) -> bool {
        matches!(
            self,
            Mechanisms::Seccomp | Mechanisms::Both | Mechanisms::All
        )
    }

    fn audit(self) -> bool {
        matches!(self, Mechanisms::Audit | Mechanisms::All)
    }
}

/// The ablation child: `__confine-only MECHANISMS WORK BACKUP SCRIPT`.
/// Applies the run's Landlock rules and/or seccomp filters to itself, then
/// becomes `python3 SCRIPT WORK` in a session of its own, like the bare
/// side.
fn confine_only(args: &[String]) -> ! {
    use rollguard_agent::sandbox::spec::MIN_LANDLOCK_ABI;
    use rollguard_agent::sandbox::{landlock_rules, seccomp_filter, seccomp_install};
    use rollguard_agent::sandbox::{SandboxScope, SandboxSpec};
    use rollguard_shared::path::ScopePath;
    use std::os::unix::process::CommandExt;

    let [mechanisms, work, backup, script] = args else {
        panic!("usage: {CONFINE_ONLY} MECHANISMS WORK BACKUP SCRIPT");
    };
    let mechanisms = Mechanisms::ALL
        .into_iter()
        .find(|m| m.name() == mechanisms)
        .expect("mechanisms");
    // A session of its own, like the bare side; EPERM if we already lead
    // a process group (started by hand), which is as good.
    let _ = nix::unistd::setsid();
    if mechanisms == Mechanisms::Overlay {
        overlay_over(Path::new(work));
    }
    if mechanisms.audit() {
        // As stage 2 does: a session of its own, and the run's rules for
        // it. The parent removes them after the child exits
        // (`exit_rules::sweep_orphans`), outside the timed part.
        let session = rollguard_agent::sandbox::audit_session::start_new().unwrap();
        rollguard_agent::kernel_audit::exit_rules::install(session).unwrap();
    }
    nix::sys::prctl::set_no_new_privs().unwrap();
    if mechanisms.landlock() {
        let scope = vec![ScopePath::parse(work).unwrap()];
        let spec = SandboxSpec {
            run_id: "ablation".into(),
            payload_dir: Path::new(BASE).join("src-files"),
            run_dir: Path::new(BASE).join("ablation-run"),
            command: vec![PYTHON.into()],
            env: Default::default(),
            scope: SandboxScope {
                write: scope.clone(),
                delete: scope,
                read: vec![],
                network: vec![],
            },
            protected: vec![PathBuf::from(backup)],
            pins: vec![],
            landlock_min_abi: MIN_LANDLOCK_ABI,
            limits: Default::default(),
            preview: false,
            list_every_directory: false,
        };
        landlock_rules::restrict_self(&spec).unwrap();
    }
    if mechanisms.seccomp() {
        for filter in seccomp_filter::all_filters().unwrap() {
            if filter.logged {
                seccomp_install::install_logged(&filter.program).unwrap();
            } else {
                seccomp_install::install_unlogged(&filter.program).unwrap();
            }
        }
    }
    let error = Command::new(PYTHON).arg(script).arg(work).exec();
    panic!("exec {PYTHON}: {error}");
}

/// Mount an overlay over `work` in a mount namespace of this process's
/// own, as a preview's layer: `work` the lower layer, the upper on a tmpfs.
fn overlay_over(work: &Path) {
    use nix::mount::{mount, MsFlags};
    use rollguard_agent::sandbox::preview_layers::OVERLAY_OPTIONS;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .unwrap();
    let staging = Path::new(BASE).join("ablation-overlay");
    fs::create_dir_all(&staging).unwrap();
    mount(
        Some("tmpfs"),
        &staging,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0700"),
    )
    .unwrap();
    let (upper, workdir) = (staging.join("upper"), staging.join("work"));
    fs::create_dir(&upper).unwrap();
    fs::create_dir(&workdir).unwrap();
    let options = format!(
        "lowerdir={},upperdir={},workdir={},{OVERLAY_OPTIONS}",
        work.display(),
        upper.display(),
        workdir.display()
    );
    mount(
        Some("overlay"),
        work,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(CONFINE_ONLY) {
        confine_only(&args[2..]);
    }
    let runs: usize = std::env::var("ROLLGUARD_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let work_on_disk = std::env::var_os("ROLLGUARD_BENCH_WORK_ON_DISK").is_some();
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_rollguard-agent"));
    let _ = Command::new("umount")
        .arg(Path::new(BASE).join("work"))
        .status();
    let _ = Command::new("umount")
        .arg(Path::new(BASE).join("state-tmpfs"))
        .status();
    let _ = fs::remove_dir_all(BASE);
    fs::create_dir_all(BASE).unwrap();
    let base = Path::new(BASE);
    let work = base.join("work");
    fs::create_dir_all(&work).unwrap();
    let _work_mount = (!work_on_disk).then(|| Tmpfs::mount(work.clone()));
    let _state_mount = Tmpfs::mount(base.join("state-tmpfs"));

    // Keys, trust and policy.
    let key = base.join("key");
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen (openssh-client) is needed");
    assert!(status.success());
    let public = fs::read_to_string(key.with_extension("pub")).unwrap();
    let mut f = public.split_whitespace();
    fs::write(
        base.join("allowed_signers"),
        format!("bench {} {}\n", f.next().unwrap(), f.next().unwrap()),
    )
    .unwrap();
    let private = signature::load_private_key_with_passphrase(&key, None).unwrap();
    let write_policy = |file: &str, state: PathBuf| {
        let path = base.join(file);
        fs::write(
            &path,
            format!(
                "[host]\nname = \"bench-01\"\n[trust]\nallowed_signers = {:?}\nthreshold = 1\ndelete_threshold = 1\n[protect]\npaths = [{:?}]\n[limits]\nallow_scopes = [{:?}]\n[state]\ndir = {:?}\n",
                base.join("allowed_signers"),
                base.join("backup"),
                work,
                state
            ),
        )
        .unwrap();
        path
    };
    let policy = write_policy("agent.toml", base.join("state"));
    let policy_tmpfs_state = write_policy("agent-tmpfs-state.toml", base.join("state-tmpfs/state"));
    fs::create_dir_all(base.join("backup")).unwrap();

    let workload = format!(
        "import os, sys\nd = sys.argv[1]\nfor i in range({FILES}):\n    p = os.path.join(d, 'f%d' % i)\n    with open(p, 'w') as f: f.write('x')\nfor i in range({FILES}):\n    os.unlink(os.path.join(d, 'f%d' % i))\n"
    );
    let files_bundles = build_bundles(
        base,
        &private,
        "files",
        runs + 1,
        &work,
        &format!("#!/bin/sh\nexec {PYTHON} ./work.py {}\n", work.display()),
        Some(&workload),
    );
    // For 3.: versions 1..=runs for real (`Pairs::measure` counts from 1),
    // the newest (never run for real) for every preview.
    let preview_bundles = build_bundles(
        base,
        &private,
        "files-preview",
        runs + 2,
        &work,
        &format!("#!/bin/sh\nexec {PYTHON} ./work.py {}\n", work.display()),
        Some(&workload),
    );
    // Used with both state directories (each keeps its own versions).
    let trivial_bundles = build_bundles(
        base,
        &private,
        "trivial",
        runs + 1,
        &work,
        "#!/bin/sh\ntrue\n",
        None,
    );
    fs::write(base.join("work.py"), &workload).unwrap();
    let trivial_script = base.join("trivial.sh");
    fs::write(&trivial_script, "#!/bin/sh\ntrue\n").unwrap();
    fs::set_permissions(&trivial_script, fs::Permissions::from_mode(0o755)).unwrap();

    let agent_run = |policy: &Path, bundle: &Path, preview: bool| {
        let cpu = children_cpu();
        let t = Instant::now();
        let out = Command::new(&agent)
            .arg("run")
            .arg("--policy")
            .arg(policy)
            .arg(bundle)
            .arg("--json")
            .args(preview.then_some("--preview"))
            .stderr(Stdio::null())
            .output()
            .unwrap();
        let elapsed = Sample {
            wall: t.elapsed(),
            cpu: children_cpu() - cpu,
        };
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report");
        assert_eq!(report["status"], "succeeded", "{report}");
        assert_eq!(report["preview"].is_object(), preview, "{report}");
        elapsed
    };
    let sandboxed = |policy: &Path, bundle: &Path| agent_run(policy, bundle, false);
    // In a new session, as stage 2 puts the bundle: with autogroup
    // scheduling (the Debian default) a session is a CPU scheduling group,
    // so on a machine busy with other work a baseline left in the bench's
    // own session gets a different CPU share than the bundle and the ratio
    // measures the scheduler, not the sandbox (observed: 0.4).
    let bare_files = || {
        timed(
            Command::new("setsid")
                .arg("--wait")
                .arg(PYTHON)
                .arg(base.join("work.py"))
                .arg(&work),
        )
    };
    let bare_trivial = || timed(&mut Command::new(&trivial_script));

    // Warm-up (page cache, first-run effects), not counted.
    sandboxed(&policy, &files_bundles[0]);
    bare_files();
    sandboxed(&policy, &trivial_bundles[0]);
    sandboxed(&policy_tmpfs_state, &trivial_bundles[0]);
    bare_trivial();

    let files = Pairs::measure(
        runs,
        |i| sandboxed(&policy, &files_bundles[i]),
        |_| bare_files(),
    );
    let trivial = Pairs::measure(
        runs,
        |i| sandboxed(&policy, &trivial_bundles[i]),
        |_| bare_trivial(),
    );
    let trivial_tmpfs = Pairs::measure(
        runs,
        |i| sandboxed(&policy_tmpfs_state, &trivial_bundles[i]),
        |_| bare_trivial(),
    );
    agent_run(&policy, &preview_bundles[runs + 1], true);
    let preview = Pairs::measure(
        runs,
        |_| agent_run(&policy, &preview_bundles[runs + 1], true),
        |i| agent_run(&policy, &preview_bundles[i], false),
    );
    let flush = fsync_latency(&base.join("fsync-probe"), runs.max(9));

    // 4. Each mechanism alone, rounds rotating which goes first.
    fs::create_dir_all(base.join("ablation-run")).unwrap();
    let confined_only = |m: Mechanisms| {
        let sample = timed(
            Command::new(std::env::current_exe().unwrap())
                .arg(CONFINE_ONLY)
                .arg(m.name())
                .arg(&work)
                .arg(base.join("backup"))
                .arg(base.join("work.py")),
        );
        if m.audit() {
            // The child's session has no process left: its rules go, so
            // the next child measures only its own mechanisms.
            rollguard_agent::kernel_audit::exit_rules::sweep_orphans().unwrap();
        }
        sample
    };
    for m in Mechanisms::ALL {
        confined_only(m);
    }
    let mut ablation: Vec<Vec<Sample>> = vec![Vec::new(); Mechanisms::ALL.len()];
    for round in 0..runs {
        for k in 0..Mechanisms::ALL.len() {
            let i = (round + k) % Mechanisms::ALL.len();
            ablation[i].push(confined_only(Mechanisms::ALL[i]));
        }
    }

    let on = if work_on_disk { "disk" } else { "tmpfs" };
    let wall = |s: &Sample| s.wall;
    let cpu = |s: &Sample| s.cpu;
    println!("sandbox overhead, {runs} interleaved pairs each: median [min .. max]");
    println!("create+delete {FILES} files (on {on})");
    println!(
        "  bare, wall clock                      {}",
        ms(&Pairs::wall(&files.bare))
    );
    println!(
        "  sandboxed, wall clock                 {}",
        ms(&Pairs::wall(&files.sandboxed))
    );
    println!(
        "  ratio sandboxed/bare, wall, per pair  {}",
        stat(&files.ratios(wall), "")
    );
    println!(
        "  ratio of the best wall-clock runs     {:.3}",
        best(&Pairs::wall(&files.sandboxed)) / best(&Pairs::wall(&files.bare))
    );
    println!(
        "  bare, CPU time                        {}",
        ms(&Pairs::cpu(&files.bare))
    );
    println!(
        "  sandboxed, CPU time (agent included)  {}",
        ms(&Pairs::cpu(&files.sandboxed))
    );
    println!(
        "  ratio sandboxed/bare, CPU, per pair   {}",
        stat(&files.ratios(cpu), "")
    );
    println!("trivial bundle");
    println!(
        "  script bare                           {}",
        ms(&Pairs::wall(&trivial.bare))
    );
    println!(
        "  agent run, state on disk              {}",
        ms(&Pairs::wall(&trivial.sandboxed))
    );
    println!(
        "  added latency, state on disk          {}",
        stat(&trivial.differences_ms(), " ms")
    );
    println!(
        "  agent run, state on tmpfs             {}",
        ms(&Pairs::wall(&trivial_tmpfs.sandboxed))
    );
    println!(
        "  added latency, state on tmpfs         {}",
        stat(&trivial_tmpfs.differences_ms(), " ms")
    );
    println!(
        "  agent run CPU time (whole tree)       {}",
        ms(&Pairs::cpu(&trivial_tmpfs.sandboxed))
    );
    println!("  durable replace on the state's disk   {}", ms(&flush));
    println!("create+delete {FILES} files as a preview vs the same run for real (on {on})");
    println!(
        "  real run, wall clock                  {}",
        ms(&Pairs::wall(&preview.bare))
    );
    println!(
        "  preview, wall clock                   {}",
        ms(&Pairs::wall(&preview.sandboxed))
    );
    println!(
        "  ratio preview/real, wall, per pair    {}",
        stat(&preview.ratios(wall), "")
    );
    println!(
        "  ratio preview/real, CPU, per pair     {}",
        stat(&preview.ratios(cpu), "")
    );
    println!("create+delete {FILES} files, one mechanism at a time (CPU time)");
    for (i, m) in Mechanisms::ALL.into_iter().enumerate() {
        let cpu: Vec<Duration> = ablation[i].iter().map(|s| s.cpu).collect();
        let ratios: Vec<f64> = ablation[i]
            .iter()
            .zip(&ablation[0])
            .map(|(s, n)| s.cpu.as_secs_f64() / n.cpu.as_secs_f64())
            .collect();
        println!(
            "  {:<9} {}  ratio to neither, per round {}",
            m.name(),
            ms(&cpu),
            stat(&ratios, "")
        );
    }
    drop(_work_mount);
    drop(_state_mount);
    let _ = fs::remove_dir_all(BASE);
}

/// What one durable replace costs on the state directory's file system:
/// write a file, fsync it, rename it into place, fsync the directory.
fn fsync_latency(dir: &Path, runs: usize) -> Vec<Duration> {
    use std::io::Write;
    fs::create_dir_all(dir).unwrap();
    let out = (0..runs)
        .map(|i| {
            let t = Instant::now();
            let tmp = dir.join(format!(".f{i}"));
            let mut f = fs::File::create(&tmp).unwrap();
            f.write_all(b"{\"version\":1}").unwrap();
            f.sync_all().unwrap();
            fs::rename(&tmp, dir.join("f")).unwrap();
            fs::File::open(dir).unwrap().sync_all().unwrap();
            t.elapsed()
        })
        .collect();
    let _ = fs::remove_dir_all(dir);
    out
}

fn best(v: &[Duration]) -> f64 {
    v.iter()
        .map(Duration::as_secs_f64)
        .fold(f64::INFINITY, f64::min)
}

/// Build `count` signed bundles with versions 1..=count (each run needs a
/// newer version: rollback protection).
fn build_bundles(
    base: &Path,
    key: &signature::PrivateKey,
    name: &str,
    count: usize,
    work: &Path,
    script: &str,
    workload: Option<&str>,
) -> Vec<PathBuf> {
    let src = base.join(format!("src-{name}"));
    fs::create_dir_all(&src).unwrap();
    let run = src.join("run.sh");
    fs::write(&run, script).unwrap();
    fs::set_permissions(&run, fs::Permissions::from_mode(0o755)).unwrap();
    if let Some(w) = workload {
        fs::write(src.join("work.py"), w).unwrap();
    }
    (1..=count)
        .map(|v| {
            fs::write(
                src.join("bundle.toml"),
                format!(
                    "[bundle]\nname = \"bench-{name}\"\nversion = {v}\nexpires = 2099-01-01T00:00:00Z\n[targets]\nhosts = [\"bench-*\"]\n[scope]\nwrite = [{work:?}]\ndelete = [{work:?}]\n[run]\ncommand = [\"./run.sh\"]\ntimeout = \"5m\"\n"
                ),
            )
            .unwrap();
            let built = archive::build(&src, &BuildOptions::default()).unwrap();
            let sig = signature::sign(&built.manifest_bytes, key, None).unwrap();
            let signed = archive::add_signature(&built.bytes, StoredSignature { armored: sig.armored, signer: None }, &Limits::default()).unwrap();
            let path = base.join(format!("{name}-{v}.bundle"));
            fs::write(&path, signed).unwrap();
            path
        })
        .collect()
}
