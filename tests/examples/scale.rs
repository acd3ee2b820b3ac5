//! Scale benchmarks (figures, never pass/fail thresholds): a real controller
//! and N real agent daemons (`rollguard-simulate`, a few processes, each
//! host with its own certificate, policy, state directory, mutual-TLS
//! connection and real sandboxed runs) on loopback. See docs/scale.md.
//!
//! ```text
//! cargo build --release -p rollguard-agent -p rollguard-controller -p rollguard-cli
//! cargo run --release -p rollguard-tests --example scale -- rollout 1000 10000
//! cargo run --release -p rollguard-tests --example scale -- ansible 100
//! cargo run --release -p rollguard-tests --example scale -- kill 1000
//! cargo run --release -p rollguard-tests --example scale -- memory 10000
//! cargo run --release -p rollguard-tests --example scale -- control-plane 10000
//! ```
//!
//! `control-plane N`: the controller and the protocol alone: two replicas
//! on a real PostgreSQL (started for the run), N hosts whose run orders are
//! answered by the harness executor (nothing runs; `rollguard-simulate
//! --executor harness`, test-only).
//!
//! Options (environment): `SCALE_PROCESSES` simulate processes (default 4),
//! `SCALE_MAX_RUNNING` bundles running at once per simulate process (default
//! 4; see `rollguard-simulate --help`).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rollguard_tests::scale::{is_dead, poll, processes_with, rss_kib, ScaleFleet, BASE};
use rollguard_tests::{bin, run_ok};

const PATIENCE: Duration = Duration::from_secs(3600);

fn processes() -> usize {
    std::env::var("SCALE_PROCESSES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}

fn fleet(n: usize, extra: usize, kill_ack: &str) -> ScaleFleet {
    let t = Instant::now();
    let f = ScaleFleet::new(n + extra, kill_ack);
    eprintln!(
        "[setup] {} hosts enrolled (certificates, policies) in {:.1}s under {}",
        n + extra,
        t.elapsed().as_secs_f64(),
        f.root().display()
    );
    f
}

fn max_running() -> usize {
    std::env::var("SCALE_MAX_RUNNING")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}

fn start(f: &mut ScaleFleet, n: usize, max_running: usize) {
    f.start_controller();
    let took = f.start_agents_of(n, processes(), max_running);
    eprintln!(
        "[setup] {n} agents connected in {:.1}s ({} simulate processes, at most {max_running} bundles running per process)",
        took.as_secs_f64(),
        processes()
    );
}

/// Seconds between two RFC 3339 UTC timestamps of the same run (the
/// controller's `created_at`/`updated_at`), e.g. 2026-11-23T19:40:01.123Z.
fn seconds_between(a: &str, b: &str) -> Option<f64> {
    fn secs(t: &str) -> Option<f64> {
        let (date, time) = t.trim_end_matches('Z').split_once('T')?;
        let day: f64 = date.rsplit('-').next()?.parse().ok()?;
        let mut parts = time.split(':');
        let h: f64 = parts.next()?.parse().ok()?;
        let m: f64 = parts.next()?.parse().ok()?;
        let s: f64 = parts.next()?.parse().ok()?;
        Some(day * 86400.0 + h * 3600.0 + m * 60.0 + s)
    }
    Some(secs(b)? - secs(a)?)
}

/// Roll a no-op bundle (`/bin/true`, sandboxed) out to every connected
/// host; returns (seconds, as the controller recorded it).
fn rollout(f: &ScaleFleet, n: usize, label: &str) -> f64 {
    let bundle = f.bundle(label, &["/bin/true"], "5m");
    let done_before = f
        .metric("rollguard_rollouts{state=\"completed\"}")
        .unwrap_or(0.0);
    let wall = Instant::now();
    let id = f.start_rollout(&bundle, &["--waves", "1,1%,10%,100%", "--bake", "0s"]);
    poll(
        "the rollout to complete",
        PATIENCE,
        Duration::from_millis(50),
        || {
            let done = f.metric("rollguard_rollouts{state=\"completed\"}")?;
            if done > done_before {
                return Some(());
            }
            let halted = f
                .metric("rollguard_rollouts{state=\"halted\"}")
                .unwrap_or(0.0);
            if halted > 0.0 {
                let status = f.status(&id);
                let bad: Vec<&serde_json::Value> = status["hosts"]
                    .as_array()
                    .map(|h| {
                        h.iter()
                            .filter(|h| h["state"] != "succeeded")
                            .take(3)
                            .collect()
                    })
                    .unwrap_or_default();
                panic!(
                    "rollout halted after {:.1}s: {}\n{bad:#?}\n{}",
                    wall.elapsed().as_secs_f64(),
                    status["halt_reason"],
                    f.logs()
                );
            }
            None
        },
    );
    let wall = wall.elapsed().as_secs_f64();
    let status = f.status(&id);
    let hosts = status["hosts"].as_array().expect("hosts");
    let ok = hosts.iter().filter(|h| h["state"] == "succeeded").count();
    assert_eq!(ok, n, "every host succeeded: {}", status["halt_reason"]);
    let mut durations: Vec<f64> = hosts
        .iter()
        .filter_map(|h| h["report"]["duration_ms"].as_f64())
        .collect();
    durations.sort_by(f64::total_cmp);
    println!(
        "         N={n:>6}  one host's run (agent-side duration_ms: verify + sandbox + audit): p50 {:.0} ms  p99 {:.0} ms  max {:.0} ms",
        percentile(&durations, 50.0),
        percentile(&durations, 99.0),
        durations.last().copied().unwrap_or(f64::NAN)
    );
    let recorded = seconds_between(
        status["created_at"].as_str().unwrap_or(""),
        status["updated_at"].as_str().unwrap_or(""),
    )
    .unwrap_or(wall);
    println!(
        "rollout  N={n:>6}  waves [1,1%,10%,100%] bake 0: {recorded:.2} s (wall incl. CLI {wall:.2} s)  \
         per host {:.2} ms  ({} waves: {:?} hosts)",
        recorded * 1000.0 / n as f64,
        status["plan"]["waves"].as_array().map_or(0, Vec::len),
        status["plan"]["waves"]
            .as_array()
            .map(|w| w.iter().map(|x| x.as_array().map_or(0, Vec::len)).collect::<Vec<_>>())
            .unwrap_or_default(),
    );
    recorded
}

fn bench_rollout(sizes: &[usize]) {
    for &n in sizes {
        let mut f = fleet(n, 0, "60s");
        start(&mut f, n, max_running());
        report_controller_rss(&f, n);
        rollout(&f, n, "noop");
    }
}

fn report_controller_rss(f: &ScaleFleet, n: usize) {
    std::thread::sleep(Duration::from_secs(3));
    let ctl = rss_kib(f.controller_pid()).unwrap_or(0);
    let sims: u64 = f.sim_pids().iter().filter_map(|p| rss_kib(*p)).sum();
    println!(
        "memory   N={n:>6}  controller RSS {:.1} MiB ({:.1} KiB/agent)  simulate processes {:.1} MiB total ({:.1} KiB/agent)",
        ctl as f64 / 1024.0,
        ctl as f64 / n as f64,
        sims as f64 / 1024.0,
        sims as f64 / n as f64
    );
}

/// The same job with ansible-core: N hosts in the inventory, all
/// `ansible_connection=local`, serial [1, "1%", "10%", "100%"], forks 50,
/// `command: /bin/true`.
fn ansible(n: usize) -> f64 {
    let venv = std::path::Path::new(BASE).join("ansible-venv");
    let playbook_bin = venv.join("bin/ansible-playbook");
    if !playbook_bin.exists() {
        run_ok(Command::new("python3").args(["-m", "venv"]).arg(&venv));
        run_ok(Command::new(venv.join("bin/pip")).args(["install", "-q", "ansible-core"]));
    }
    let dir = tempfile::Builder::new()
        .prefix("ansible-")
        .tempdir_in(BASE)
        .expect("ansible dir");
    let mut inventory = String::from("[fleet]\n");
    for i in 0..n {
        inventory.push_str(&format!("host-{i:05} ansible_connection=local\n"));
    }
    // The venv's own Python (interpreter discovery may find a shim).
    inventory.push_str(&format!(
        "\n[fleet:vars]\nansible_python_interpreter={}\n",
        venv.join("bin/python").display()
    ));
    std::fs::write(dir.path().join("inventory.ini"), inventory).expect("inventory");
    std::fs::write(
        dir.path().join("playbook.yml"),
        "- hosts: fleet\n  gather_facts: false\n  serial: [1, \"1%\", \"10%\", \"100%\"]\n  tasks:\n    - command: /bin/true\n",
    )
    .expect("playbook");
    std::fs::write(
        dir.path().join("ansible.cfg"),
        "[defaults]\nforks = 50\nhost_key_checking = False\ninterpreter_python = auto_silent\n",
    )
    .expect("ansible.cfg");
    let t = Instant::now();
    let out = Command::new(&playbook_bin)
        .args(["-i", "inventory.ini", "playbook.yml"])
        .current_dir(dir.path())
        .env("ANSIBLE_CONFIG", dir.path().join("ansible.cfg"))
        .stdin(Stdio::null())
        .output()
        .expect("ansible-playbook");
    let secs = t.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ansible-playbook failed:\n{text}");
    let recap_ok = text
        .lines()
        .filter(|l| l.starts_with("host-") && l.contains("ok=1") && l.contains("failed=0"))
        .count();
    assert_eq!(recap_ok, n, "every host ran /bin/true once:\n{text}");
    println!(
        "ansible  N={n:>6}  serial [1,1%,10%,100%] forks 50 connection=local command /bin/true: {secs:.2} s  per host {:.2} ms",
        secs * 1000.0 / n as f64
    );
    secs
}

fn bench_ansible(n: usize) {
    let mut f = fleet(n, 0, "60s");
    start(&mut f, n, max_running());
    let rg = rollout(&f, n, "noop");
    drop(f);
    let an = ansible(n);
    println!(
        "ratio    N={n:>6}  per-host cost ansible / rollguard = {:.1}x (rollguard {:.2} ms/host, ansible {:.2} ms/host)",
        an / rg,
        rg * 1000.0 / n as f64,
        an * 1000.0 / n as f64
    );
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[idx.clamp(1, sorted.len()) - 1]
}

fn bench_kill(n: usize) {
    let mut f = fleet(n, 0, "120s");
    // Every host's long bundle runs at once: no bound per process.
    start(&mut f, n, 0);
    let marker = format!("87{}", f.port);
    let bundle = f.bundle("long", &["/bin/sleep", &marker], "30m");
    let t = Instant::now();
    f.start_rollout(
        &bundle,
        &["--waves", "100%", "--all-at-once", "--bake", "0s"],
    );
    let pattern = format!("sleep {marker}");
    let pids = poll(
        "a bundle process on every host",
        PATIENCE,
        Duration::from_secs(2),
        || {
            let p = processes_with(&pattern);
            eprintln!("[kill] {} of {n} bundles running", p.len());
            (p.len() >= n).then_some(p)
        },
    );
    eprintln!(
        "[kill] all {n} long bundles running (sandboxed) after {:.1}s",
        t.elapsed().as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(2));
    let t0_day = day_seconds_now();
    let t0 = Instant::now();
    let cli = f
        .cli()
        .args(["kill", "--all", "--reason", "benchmark", "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("rollguard kill");
    let mut alive: Vec<u32> = pids.clone();
    let mut deaths: Vec<f64> = Vec::with_capacity(n);
    let mut rounds = 0u64;
    while !alive.is_empty() && t0.elapsed() < PATIENCE {
        let now = t0.elapsed().as_secs_f64();
        alive.retain(|p| {
            if is_dead(*p) {
                deaths.push(now);
                false
            } else {
                true
            }
        });
        rounds += 1;
    }
    let cli_out = cli.wait_with_output().expect("rollguard kill output");
    let cli_secs = t0.elapsed().as_secs_f64();
    let v: serde_json::Value = serde_json::from_slice(&cli_out.stdout).unwrap_or_default();
    deaths.sort_by(f64::total_cmp);
    let resolution = t0.elapsed().as_secs_f64() / rounds.max(1) as f64;
    println!(
        "kill     N={n:>6}  kill --all -> bundle process dead: p50 {:.3} s  p99 {:.3} s  max {:.3} s  \
         (poll resolution ~{:.0} ms; {} of {n} dead; agents acked {}/{}; CLI returned within {cli_secs:.2} s)",
        percentile(&deaths, 50.0),
        percentile(&deaths, 99.0),
        deaths.last().copied().unwrap_or(f64::NAN),
        resolution * 1000.0,
        deaths.len(),
        v["agents_acked"],
        v["agents_sent"],
    );
    // Where the time went: when the agents' cgroup.kill calls happened
    // (their "killing running bundle" log lines), relative to the command.
    let mut signalled: Vec<f64> = log_times(f.root(), "killing running bundle")
        .into_iter()
        .map(|t| t - t0_day)
        .collect();
    signalled.sort_by(f64::total_cmp);
    let pushed = log_times(&f.root().join("ctl"), "kill order sent");
    println!(
        "         N={n:>6}  kill --all -> agent's cgroup.kill: p50 {:.3} s  p99 {:.3} s  max {:.3} s  ({} logged); controller logged the push at {:?} s",
        percentile(&signalled, 50.0),
        percentile(&signalled, 99.0),
        signalled.last().copied().unwrap_or(f64::NAN),
        signalled.len(),
        pushed.iter().map(|t| ((t - t0_day) * 1000.0).round() / 1000.0).collect::<Vec<_>>(),
    );
}

/// Seconds since midnight UTC now.
fn day_seconds_now() -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    now % 86400.0
}

/// Seconds since midnight UTC of every log line (tracing text format,
/// RFC 3339 timestamp first) containing `what`, in `*.log` files of `dir`.
fn log_times(dir: &std::path::Path, what: &str) -> Vec<f64> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        if e.path().extension().is_none_or(|x| x != "log") {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains(what)) {
            let Some(t) = line.find('T').map(|i| &line[i + 1..]) else {
                continue;
            };
            let Some(end) = t.find('Z') else { continue };
            let mut parts = t[..end].split(':');
            let secs = (|| {
                let h: f64 = parts.next()?.parse().ok()?;
                let m: f64 = parts.next()?.parse().ok()?;
                let s: f64 = parts.next()?.parse().ok()?;
                Some(h * 3600.0 + m * 60.0 + s)
            })();
            out.extend(secs);
        }
    }
    out
}

fn bench_memory(n: usize) {
    // Host n is a standalone `rollguard-agent serve`; 0..n are simulated.
    let mut f = fleet(n, 1, "60s");
    f.start_controller();
    let agent = f.start_serve(n, 1);
    std::thread::sleep(Duration::from_secs(5));
    let idle = rss_kib(agent).unwrap_or(0);
    println!(
        "memory   idle agent daemon (rollguard-agent serve, connected): RSS {:.1} MiB",
        idle as f64 / 1024.0
    );
    let took = f.start_agents_of(n, processes(), max_running());
    eprintln!(
        "[setup] {n} more agents connected in {:.1}s",
        took.as_secs_f64()
    );
    report_controller_rss(&f, n + 1);
    let idle_after = rss_kib(agent).unwrap_or(0);
    println!(
        "memory   idle agent daemon after the fleet connected: RSS {:.1} MiB",
        idle_after as f64 / 1024.0
    );
}

/// Clock ticks per second of the CPU counters in /proc (USER_HZ).
fn clk_tck() -> f64 {
    // SAFETY: sysconf reads a constant of the C library; no memory involved.
    let t = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// User + system CPU of a process so far, in clock ticks (fields 14 and 15
/// of /proc/PID/stat; all its threads, live and exited); None once it is gone.
fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses and may hold
    // spaces): state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(ticks(11)? + ticks(12)?)
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    process_ticks(pid).unwrap_or(0) as f64 / clk_tck()
}

/// The machine's CPU time so far from the `cpu` line of /proc/stat, in
/// clock ticks summed over all CPUs: (busy, idle, steal). Busy is user,
/// nice, system, irq and softirq (guest time is already inside user); idle
/// includes iowait; steal is time the hypervisor gave this VM's CPUs to
/// someone else, kept apart because it is neither our work nor idle.
fn machine_ticks() -> (u64, u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let f = |i: usize| v.get(i).copied().unwrap_or(0);
    (f(0) + f(1) + f(2) + f(5) + f(6), f(3) + f(4), f(7))
}

/// The PostgreSQL server's processes: the postmaster (first line of
/// `data/postmaster.pid` in the cluster's directory, tests/src/postgres.rs)
/// and its children (backends, WAL writer, checkpointer, ...).
fn postgres_pids(pg: &rollguard_tests::postgres::PgCluster) -> Vec<u32> {
    let pidfile = pg.socket_dir().join("data/postmaster.pid");
    let text = std::fs::read_to_string(pidfile).unwrap_or_default();
    let Some(master) = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<u32>().ok())
    else {
        return Vec::new();
    };
    let mut out = vec![master];
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // Field 4, the parent's pid, is the second after the command name.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(master) {
            out.push(pid);
        }
    }
    out
}

/// One reading of the CPU counters during the kill window.
struct CpuSample {
    /// Seconds since the kill command was about to be sent.
    at: f64,
    /// The machine's (busy, idle, steal) ticks ([`machine_ticks`]).
    machine: (u64, u64, u64),
    /// User + system ticks of each group of processes.
    groups: Vec<u64>,
}

/// Issue 14: is the kill's tail (the last hosts' acknowledgements, ~1 s
/// after the replicas sent the order at ~0.05 s) the simulated agents,
/// controllers and PostgreSQL competing for the machine's CPUs, or time
/// spent waiting? A thread reads the machine's and each group's CPU
/// counters every 10 ms from just before the command; the window's end,
/// the last host's kill state durable, is only known afterwards (from the
/// files' modification times), so the samples are kept and the first one
/// at or after that end closes the window. Reading ~20 small /proc files
/// every 10 ms is this process's own CPU, reported as "benchmark".
struct CpuSampler {
    names: Vec<String>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<CpuSample>>,
}

impl CpuSampler {
    /// Take the first sample now (before the caller sends the command),
    /// then one every 10 ms on a thread until [`CpuSampler::report`].
    fn start(origin: Instant, groups: Vec<(String, Vec<u32>)>) -> CpuSampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let names = groups.iter().map(|g| g.0.clone()).collect();
        // A process that exits during the window keeps the ticks it was
        // last seen with (its CPU after that falls to "other").
        let mut last: Vec<Vec<u64>> = groups.iter().map(|g| vec![0; g.1.len()]).collect();
        let mut sample = move || {
            let machine = machine_ticks();
            let mut sums = Vec::with_capacity(groups.len());
            for (g, (_, pids)) in groups.iter().enumerate() {
                for (k, pid) in pids.iter().enumerate() {
                    if let Some(t) = process_ticks(*pid) {
                        last[g][k] = t;
                    }
                }
                sums.push(last[g].iter().sum());
            }
            CpuSample {
                at: origin.elapsed().as_secs_f64(),
                machine,
                groups: sums,
            }
        };
        let mut samples = vec![sample()];
        let flag = stop.clone();
        let thread = std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(10));
            let done = flag.load(std::sync::atomic::Ordering::Relaxed);
            samples.push(sample());
            if done {
                return samples;
            }
        });
        CpuSampler {
            names,
            stop,
            thread,
        }
    }

    /// Stop sampling and describe the CPU from the first sample to the first
    /// one at or after `end` seconds: the machine's busy share of all its
    /// CPUs, each group's CPU seconds, "other" (the machine's busy time not
    /// in any group: other processes, kernel threads, interrupts), and per
    /// 0.1 s the machine's, the replicas' and the simulated agents' shares,
    /// to show whether the machine stayed saturated through the tail.
    fn report(self, n: usize, end: f64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let samples = self.thread.join().expect("CPU sampler");
        let first = &samples[0];
        let last = samples
            .iter()
            .find(|s| s.at >= end)
            .unwrap_or_else(|| samples.last().expect("a sample"));
        let hz = clk_tck();
        let busy_share = |a: &CpuSample, b: &CpuSample| {
            let busy = b.machine.0 - a.machine.0;
            let total = busy + (b.machine.1 - a.machine.1) + (b.machine.2 - a.machine.2);
            (100.0 * busy as f64 / total.max(1) as f64).round()
        };
        let steal = last.machine.2 - first.machine.2;
        let total = (last.machine.0 + last.machine.1 + last.machine.2)
            - (first.machine.0 + first.machine.1 + first.machine.2);
        let busy = last.machine.0 - first.machine.0;
        let mut parts = Vec::new();
        let mut grouped = 0i64;
        for (g, name) in self.names.iter().enumerate() {
            let used = last.groups[g] as i64 - first.groups[g] as i64;
            grouped += used;
            parts.push(format!("{name} {:.2} s", used as f64 / hz));
        }
        parts.push(format!(
            "other {:.2} s",
            (busy as i64 - grouped) as f64 / hz
        ));
        let cpus = std::thread::available_parallelism().map_or(0, |c| c.get());
        println!(
            "control  N={n:>6}  kill window {:.2} s: machine busy {:.0} % of {cpus} CPUs ({:.2} CPU-s of {:.2}; steal {:.0} %); \
             CPU: {} (clock tick {:.0} ms)",
            last.at - first.at,
            busy_share(first, last),
            busy as f64 / hz,
            total as f64 / hz,
            100.0 * steal as f64 / total.max(1) as f64,
            parts.join(", "),
            1000.0 / hz,
        );
        // Per 0.1 s: the machine's busy share, and the replicas' and the
        // simulated agents' shares of all CPUs (is the tail still work, and
        // whose?).
        let share = |a: &CpuSample, b: &CpuSample, of: &dyn Fn(&str) -> bool| {
            let total = (b.machine.0 + b.machine.1 + b.machine.2)
                - (a.machine.0 + a.machine.1 + a.machine.2);
            let used: u64 = (self.names.iter().enumerate())
                .filter(|(_, name)| of(name))
                .map(|(g, _)| b.groups[g] - a.groups[g])
                .sum();
            (100.0 * used as f64 / total.max(1) as f64).round()
        };
        let (mut busy, mut replicas, mut simulate) = (Vec::new(), Vec::new(), Vec::new());
        let mut from = first;
        for s in &samples {
            if s.at >= from.at + 0.1 || (std::ptr::eq(s, last) && s.at > from.at) {
                busy.push(busy_share(from, s));
                replicas.push(share(from, s, &|g| g.starts_with("replica")));
                simulate.push(share(from, s, &|g| g == "simulate"));
                from = s;
            }
            if std::ptr::eq(s, last) {
                break;
            }
        }
        println!(
            "         N={n:>6}  per 0.1 s of the window, % of all CPUs: machine busy {busy:?}, replicas {replicas:?}, simulate {simulate:?}"
        );
    }
}

/// Seconds from `t0` (seconds since midnight UTC) until each host's daemon
/// had the kill state of `generation` on disk (its `daemon/kill.json`,
/// written before it acknowledges), by the file's modification time.
fn kill_durable_times(f: &ScaleFleet, n: usize, generation: u64, t0: f64) -> Option<Vec<f64>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let path = f.state_dir(i).join("daemon/kill.json");
        let text = std::fs::read_to_string(&path).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        if v["fleet"]["generation"].as_u64()? < generation {
            return None;
        }
        let mtime = std::fs::metadata(&path).ok()?.modified().ok()?;
        let secs = mtime
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs_f64()
            % 86400.0;
        out.push(secs - t0);
    }
    out.sort_by(f64::total_cmp);
    Some(out)
}

fn bench_control_plane(n: usize) {
    let pg = rollguard_tests::postgres::PgCluster::start();
    pg.create_database("scale");
    let t = Instant::now();
    let mut f = ScaleFleet::replicated(n, "30s", &pg.url("scale"), 1);
    f.executor = rollguard_tests::simulate::Executor::Harness;
    eprintln!(
        "[setup] {n} hosts enrolled in {:.1}s under {}",
        t.elapsed().as_secs_f64(),
        f.root().display()
    );
    f.start_controller();
    f.start_replicas();
    let took = f.start_agents_of(n, processes(), 0);
    eprintln!(
        "[setup] {n} agents connected to 2 replicas in {:.1}s ({} simulate processes, harness executor)",
        took.as_secs_f64(),
        processes()
    );
    std::thread::sleep(Duration::from_secs(3));
    let rss: Vec<u64> = f
        .controller_pids()
        .iter()
        .filter_map(|p| rss_kib(*p))
        .collect();
    let total_rss: u64 = rss.iter().sum();
    println!(
        "control  N={n:>6}  2 replicas on PostgreSQL: controller RSS {:?} MiB, {:.1} KiB per connected agent",
        rss.iter().map(|k| (*k as f64 / 102.4).round() / 10.0).collect::<Vec<_>>(),
        total_rss as f64 / n as f64
    );
    let cpu = |f: &ScaleFleet| -> f64 { f.controller_pids().iter().map(|p| cpu_seconds(*p)).sum() };
    let before = cpu(&f);
    let recorded = rollout(&f, n, "noop-harness");
    let used = cpu(&f) - before;
    println!(
        "control  N={n:>6}  rollout [1,1%,10%,100%] bake 0: {recorded:.2} s; controller CPU {used:.2} s = {:.3} ms per host (both replicas)",
        used * 1000.0 / n as f64
    );
    // kill --all through the follower; every daemon's record of it, and
    // the CPU while it went out, by process group.
    let mut groups: Vec<(String, Vec<u32>)> = f
        .controller_pids()
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("replica {i}"), vec![*p]))
        .collect();
    groups.push(("simulate".into(), f.sim_pids()));
    groups.push(("postgres".into(), postgres_pids(&pg)));
    // This process polls the hosts' kill.json files during the window.
    groups.push(("benchmark".into(), vec![std::process::id()]));
    let t0 = day_seconds_now();
    let wall = Instant::now();
    let sampler = CpuSampler::start(wall, groups);
    let out = rollguard_tests::run_ok(
        rollguard_tests::operator_cli(&f.replica_url(1), &f.ctl(), f.root()).args([
            "kill",
            "--all",
            "--reason",
            "benchmark",
            "--json",
        ]),
    );
    let cli_secs = wall.elapsed().as_secs_f64();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let generation = v["state"]["generation"].as_u64().unwrap_or(1);
    let times = poll(
        "every host to record the kill",
        PATIENCE,
        Duration::from_millis(200),
        || kill_durable_times(&f, n, generation, t0),
    );
    println!(
        "control  N={n:>6}  kill --all via the follower -> kill state durable on the host: p50 {:.3} s  p99 {:.3} s  max {:.3} s  \
         (CLI returned in {cli_secs:.2} s; the follower's own agents acked {}/{})",
        percentile(&times, 50.0),
        percentile(&times, 99.0),
        times.last().copied().unwrap_or(f64::NAN),
        v["agents_acked"],
        v["agents_sent"],
    );
    sampler.report(n, times.last().copied().unwrap_or(f64::NAN));
    let at = |what: &str| -> Vec<f64> {
        log_times(&f.ctl(), what)
            .into_iter()
            .map(|t| ((t - t0) * 1000.0).round() / 1000.0)
            .collect()
    };
    println!(
        "         N={n:>6}  the follower sent the order at {:?} s, the leader pushed it at {:?} s",
        at("kill order sent"),
        at("kill state pushed")
    );
    drop(f);
    drop(pg);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let what = args.next().unwrap_or_default();
    let sizes: Vec<usize> = args.filter_map(|a| a.parse().ok()).collect();
    let one = |default: usize| sizes.first().copied().unwrap_or(default);
    // Each host's sandbox needs processes and descriptors; make sure the
    // binaries exist before spending minutes on setup.
    let _ = (
        bin("rollguard-agent"),
        bin("rollguard-controller"),
        bin("rollguard"),
    );
    match what.as_str() {
        "rollout" => bench_rollout(if sizes.is_empty() {
            &[1000, 10000]
        } else {
            &sizes
        }),
        "ansible" => bench_ansible(one(100)),
        "kill" => bench_kill(one(1000)),
        "memory" => bench_memory(one(10000)),
        "control-plane" => bench_control_plane(one(10000)),
        _ => {
            eprintln!(
                "usage: scale rollout N... | ansible N | kill N | memory N | control-plane N"
            );
            std::process::exit(2);
        }
    }
}
