//! Sandbox overhead, measured against a bare baseline in the same run.
//!
//! ```sh
//! sudo cargo bench -p rollguard-agent --bench sandbox_overhead
//! ```
//!
//! 1. A create-and-delete-20k-files workload (one python3 process) run bare
//!    vs as a bundle through `rollguard-agent run` (verification, unpack,
//!    Landlock, seccomp, namespaces, cgroup, audit collection included):
//!    reports the median ratio sandboxed / bare.
//! 2. A trivial bundle (`/bin/true`-like script) through `rollguard-agent
//!    run` vs running its script directly: reports the added latency.
//!
//! Runs are interleaved (A B A B ...) so drift in machine speed hits both
//! sides alike. No thresholds: this prints figures, it does not judge them.
//! Needs root, like the agent.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rollguard_shared::archive::{self, BuildOptions, Limits, StoredSignature};
use rollguard_shared::signature;

const BASE: &str = "/var/lib/rollguard-bench";
const FILES: u32 = 20_000;

fn main() {
    let runs: usize = std::env::var("ROLLGUARD_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_rollguard-agent"));
    let _ = fs::remove_dir_all(BASE);
    fs::create_dir_all(BASE).unwrap();
    let base = Path::new(BASE);
    let work = base.join("work");
    fs::create_dir_all(&work).unwrap();

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
    fs::write(
        base.join("agent.toml"),
        format!(
            "[host]\nname = \"bench-01\"\n[trust]\nallowed_signers = {:?}\nthreshold = 1\ndelete_threshold = 1\n[protect]\npaths = [{:?}]\n[limits]\nallow_scopes = [{:?}]\n[state]\ndir = {:?}\n",
            base.join("allowed_signers"),
            base.join("backup"),
            work,
            base.join("state")
        ),
    )
    .unwrap();
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
        &format!("#!/bin/sh\nexec python3 ./work.py {}\n", work.display()),
        Some(&workload),
    );
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

    let policy = base.join("agent.toml");
    let sandboxed = |bundle: &Path| {
        let t = Instant::now();
        let out = Command::new(&agent)
            .arg("run")
            .arg("--policy")
            .arg(&policy)
            .arg(bundle)
            .arg("--json")
            .stderr(Stdio::null())
            .output()
            .unwrap();
        let elapsed = t.elapsed();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report");
        assert_eq!(report["status"], "succeeded", "{report}");
        elapsed
    };
    let bare_files = || timed(Command::new("python3").arg(base.join("work.py")).arg(&work));
    let bare_trivial = || timed(&mut Command::new(&trivial_script));

    // Warm-up (page cache, first-run effects), not counted.
    sandboxed(&files_bundles[0]);
    bare_files();
    sandboxed(&trivial_bundles[0]);
    bare_trivial();

    let (mut fs_sb, mut fs_bare, mut tr_sb, mut tr_bare) = (vec![], vec![], vec![], vec![]);
    for i in 1..=runs {
        fs_sb.push(sandboxed(&files_bundles[i]));
        fs_bare.push(bare_files());
        tr_sb.push(sandboxed(&trivial_bundles[i]));
        tr_bare.push(bare_trivial());
    }
    let ratios: Vec<f64> = fs_sb
        .iter()
        .zip(&fs_bare)
        .map(|(s, b)| s.as_secs_f64() / b.as_secs_f64())
        .collect();
    let added: Vec<f64> = tr_sb
        .iter()
        .zip(&tr_bare)
        .map(|(s, b)| (s.as_secs_f64() - b.as_secs_f64()) * 1000.0)
        .collect();

    println!("sandbox overhead, {runs} interleaved runs each (median [min .. max])");
    println!("  create+delete {FILES} files  bare       {}", ms(&fs_bare));
    println!("  create+delete {FILES} files  sandboxed  {}", ms(&fs_sb));
    println!("  ratio sandboxed/bare            {}", stat(&ratios, ""));
    println!("  trivial bundle: script bare     {}", ms(&tr_bare));
    println!("  trivial bundle: agent run       {}", ms(&tr_sb));
    println!("  added latency per run           {}", stat(&added, " ms"));
    let _ = fs::remove_dir_all(BASE);
}

fn timed(cmd: &mut Command) -> Duration {
    let t = Instant::now();
    let status = cmd.stdout(Stdio::null()).status().unwrap();
    assert!(status.success());
    t.elapsed()
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

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

fn stat(v: &[f64], unit: &str) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.3}{unit} [{:.3} .. {:.3}]", median(v), min, max)
}

fn ms(v: &[Duration]) -> String {
    let v: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    stat(&v, " ms")
}
