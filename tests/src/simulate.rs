//! Many real agent daemons in one process, for load tests and benchmarks on
//! one machine (`rollguard-simulate`, a test-only program: nothing in a
//! shipped binary can stand in for a host).
//!
//! Each simulated host is a complete [`Daemon`]: its own policy file (its
//! own name, trust file, state directory and `[controller]` section with its
//! own enrolled certificate), its own mutual-TLS HTTP/2 connection, the real
//! order stream, and the real executor ([`RunnerExecutor`] →
//! `runner::run_bundle`, so every bundle is signature-checked against that
//! host's policy and run in the kernel sandbox, and every report goes back
//! over the real protocol). Nothing is shortcut; what is shared is only the
//! process: one tokio runtime (one thread) and one binary, so 10,000 hosts fit on a small
//! machine. The only part of `serve` left out is the local control socket
//! (`rollguard-agent kill`), which load tests do not use.
//!
//! With [`Executor::Harness`] (`--executor harness`) nothing is run at
//! all: each order is answered with a success report at once
//! ([`HarnessExecutor`]). That measures the controller and the protocol
//! alone, without the sandbox CPU that a real fleet spends on each host's
//! own CPU. It lives here, in the tests crate, and nowhere in a shipped
//! binary.
//!
//! Hosts are read from `DIR/<index / 100>/<prefix><index>/agent.toml`, both
//! numbers zero-padded, e.g. `DIR/004/sim-00421/agent.toml`. Why the
//! grouping: the sandbox grants access to everything outside a host's
//! protected paths by granting every sibling along the way (Landlock is
//! allow-list only), so 10,000 host directories side by side would give
//! every run 10,000 rules, which no real host has.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use rollguard_agent::daemon::executor::{BundleExecutor, RunnerExecutor};
use rollguard_agent::daemon::transport::Transport;
use rollguard_agent::daemon::{open_launcher, Daemon, MAX_CONCURRENT_RUNS};
use rollguard_agent::kill_switch::KillSignal;
use rollguard_agent::policy::HostPolicy;
use rollguard_shared::protocol::RolloutId;
use rollguard_shared::report::{RunReport, RunStatus};

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimulateOptions {
    /// The directory holding one sub-directory per host.
    pub dir: PathBuf,
    /// Host directory name prefix.
    pub prefix: String,
    /// The first host index.
    pub first: usize,
    /// How many hosts.
    pub count: usize,
    /// Bundles running at once in this process, at most (0: no bound
    /// beyond each host's own).
    pub max_running: usize,
    pub executor: Executor,
}

/// What answers a run order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Executor {
    /// The real runner: signatures, the kernel sandbox, denial collection.
    Sandbox,
    /// Nothing runs: every order is answered with a success report at once
    /// (the control plane measured alone).
    Harness,
}

/// Reports success without running anything (see the module's docs). A
/// bundle it is given is neither verified nor opened.
pub struct HarnessExecutor {
    host: String,
}

impl BundleExecutor for HarnessExecutor {
    fn run(
        &self,
        _bundle: &Path,
        rollout_id: &RolloutId,
        _kind: rollguard_agent::daemon::RunKind,
        _kill: KillSignal,
    ) -> RunReport {
        RunReport {
            exit_code: Some(0),
            denials: Some(vec![]),
            denial_count: Some(0),
            run_id: Some(format!("harness-{rollout_id}")),
            ..RunReport::new(&self.host, RunStatus::Succeeded)
        }
    }
}

/// Hosts per group directory.
pub const GROUP: usize = 100;

/// The directory of host `index`.
pub fn host_dir(dir: &Path, prefix: &str, index: usize) -> PathBuf {
    dir.join(format!("{:03}", index / GROUP))
        .join(format!("{prefix}{index:05}"))
}

/// The policy file of host `index`.
pub fn policy_path(dir: &Path, prefix: &str, index: usize) -> PathBuf {
    host_dir(dir, prefix, index).join("agent.toml")
}

/// Run the hosts until the process is stopped.
pub fn simulate(opts: &SimulateOptions) -> anyhow::Result<()> {
    anyhow::ensure!(opts.count > 0, "--count must be at least 1");
    // The sandbox's stage-2 program is looked for beside this program (in
    // the build's target directory, as beside an installed agent).
    let agent_exe = std::env::current_exe().context("locating this program")?;
    let mut hosts = Vec::with_capacity(opts.count);
    for index in opts.first..opts.first + opts.count {
        let path = policy_path(&opts.dir, &opts.prefix, index);
        let policy =
            HostPolicy::load(&path).with_context(|| format!("policy {}", path.display()))?;
        let controller = policy.controller().cloned().ok_or_else(|| {
            anyhow::anyhow!("{}: the policy has no [controller] section", path.display())
        })?;
        let transport = Transport::new(&controller)
            .with_context(|| format!("{}: controller credentials", path.display()))?;
        hosts.push((policy, transport));
    }
    // Every running bundle holds one blocking thread for its whole run (the
    // runner waits on the sandbox), so a kill test with one long bundle per
    // host needs one thread per host, not tokio's default of 512.
    // One thread for all hosts' protocol work, like one `serve` per host:
    // run several such processes to use several cores.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .max_blocking_threads(opts.count * MAX_CONCURRENT_RUNS + 16)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    // All simulated hosts share this machine's one kernel audit subsystem:
    // every run's listener receives every other run's records and sync
    // markers (O(runs²) deliveries), and each status request makes the
    // kernel spawn a thread to reply. Hundreds of runs at once time those
    // requests out, and a run whose denials cannot be observed halts the
    // rollout (rightly). Real hosts have a kernel each; here, bound the
    // runs in flight per process instead.
    let shared_slots =
        (opts.max_running > 0).then(|| Arc::new(tokio::sync::Semaphore::new(opts.max_running)));
    let launcher = open_launcher(&agent_exe);
    runtime.block_on(async move {
        for (policy, transport) in hosts {
            let identity = policy.identity();
            let state_dir = policy.state_dir().to_path_buf();
            let executor: Arc<dyn BundleExecutor> = match opts.executor {
                Executor::Sandbox => Arc::new(RunnerExecutor {
                    policy,
                    agent_exe: agent_exe.clone(),
                    launcher: launcher.clone(),
                }),
                Executor::Harness => Arc::new(HarnessExecutor {
                    host: identity.name.clone(),
                }),
            };
            let daemon = Daemon::open_with(identity, &state_dir, executor, shared_slots.clone())
                .with_context(|| format!("state directory {}", state_dir.display()))?;
            tokio::spawn(daemon.run_forever(transport));
            // Spread the connection burst over the runtime's ticks instead of
            // queueing thousands of handshakes at once.
            tokio::task::yield_now().await;
        }
        tracing::info!(
            hosts = opts.count,
            first = opts.first,
            "simulated agents started"
        );
        std::future::pending::<()>().await;
        anyhow::Ok(())
    })
}
