//! `rollguard-agent serve`: the long-running agent.
//!
//! It connects out to the controller (one mutual-TLS HTTP/2 connection,
//! see `rollguard_shared::protocol`), registers this host's name and
//! labels, and receives orders on one long-lived stream:
//!
//! - **run**: download the bundle, then run it exactly as
//!   `rollguard-agent run` does (the same runner: signatures against this
//!   host's own threshold, targets, scopes, kernel confinement) and report
//!   the same JSON report. The controller cannot make this host run
//!   anything its policy would refuse. A run order marked `retry` may run
//!   the version last started here again, only as the host's own version
//!   record allows (`state::may_start`). Each rollout runs at most once: the
//!   rollout id is recorded durably before the run, a repeated order is
//!   answered from the record, and a run that was in progress when the
//!   agent died is reported `interrupted`, never started again.
//! - **kill state**: the fleet's kill orders. Covered running bundles are
//!   killed at once (cgroup.kill) and new runs refused while in force; the
//!   state is durable, so a restarted agent still refuses. A fleet-wide kill
//!   (or a local one, from `rollguard-agent kill` over the local socket) is
//!   also written to the state directory's kill switch, which the runner
//!   itself checks, so even a manual `rollguard-agent run` is refused. All
//!   of that is [`crate::kill_switch::KillSwitch`]; the daemon routes the
//!   orders and local requests to it, and registers each run with it.
//!
//! The agent reconnects with exponential backoff (1 s to 30 s, jittered),
//! and sends reports it could not deliver when it is back. It is a single
//! thread (tokio current-thread runtime) plus one blocking thread per
//! running bundle, to stay small on every host.
//!
//! Here: the daemon's state, the run orders and their reports. Beside it:
//! `session.rs` (a connection's life, reconnects, certificate renewal),
//! `download.rs` (a bundle streamed to disk), `records.rs` (the durable
//! records and the one-daemon lock), `local.rs` (the root-only socket),
//! `transport.rs` (mutual TLS + HTTP/2), `executor.rs` (the runner).

pub mod config;
mod download;
pub mod executor;
pub mod local;
pub mod records;
mod session;
pub mod transport;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use hyper::Method;
use rollguard_shared::protocol::{AgentReport, RolloutId, Sha256Hex, MAX_JSON_BODY};
use rollguard_shared::report::{RefusalKind, RunReport, RunStatus};
use rollguard_shared::targets::HostIdentity;
use tokio::sync::Notify;

pub use crate::kill_switch::KillSignal;
use crate::kill_switch::{refused_report, KillSwitch};
use crate::state::StateDir;
pub use config::ControllerSection;
use download::BadDownload;
pub use download::MAX_BUNDLE_BYTES;
pub use executor::{BundleExecutor, RunKind, RunnerExecutor};
use local::{LocalControl, LocalRequest, LocalResponse};
use records::{HostRolloutRecord, Phase, RecordError, Records};
use transport::{ControllerSession, Transport, TransportError};

/// Largest report recorded and sent: the controller's body limit, less
/// room for the envelope ([`AgentReport`]'s rollout id and field names).
const MAX_REPORT_BYTES: usize = MAX_JSON_BODY - 4096;

#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// The local control socket.
    pub socket: PathBuf,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        DaemonOptions {
            socket: PathBuf::from(local::DEFAULT_SOCKET),
        }
    }
}

pub struct Daemon {
    /// Held for the daemon's life: one daemon per state directory.
    _instance: records::InstanceLock,
    identity: HostIdentity,
    records: Records,
    executor: Arc<dyn BundleExecutor>,
    /// The kill state, its storage and the running runs' kill signals.
    kill: KillSwitch,
    /// Finished runs whose report the controller has not accepted yet.
    unacked: Mutex<BTreeSet<RolloutId>>,
    /// Reports whose record could not be written (a full disk: a bundle
    /// may have filled it). Sent from here rather than lost; after a
    /// restart the record still says started, so the rollout is reported
    /// interrupted then (the controller keeps the first report).
    undurable: Mutex<std::collections::HashMap<RolloutId, RunReport>>,
    outbox: Notify,
    /// Bounds concurrent downloads and runs: the controller is trusted to
    /// order, not to exhaust the host.
    run_slots: tokio::sync::Semaphore,
    /// A bound shared with other daemons in the same process (the tests crate's `rollguard-simulate`:
    /// many hosts on one kernel), taken after `run_slots`.
    shared_slots: Option<Arc<tokio::sync::Semaphore>>,
}

/// Bundles downloading or running at once, at most.
pub const MAX_CONCURRENT_RUNS: usize = 4;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Daemon {
    /// Open the daemon's state: recover the kill state (a corrupt kill file
    /// counts as a kill in force) and turn runs left "started" by a previous
    /// process into `interrupted` reports.
    pub fn open(
        identity: HostIdentity,
        state_dir: &std::path::Path,
        executor: Arc<dyn BundleExecutor>,
    ) -> anyhow::Result<Arc<Self>> {
        Self::open_with(identity, state_dir, executor, None)
    }

    /// [`Daemon::open`], with runs also bounded by `shared_slots` (shared by
    /// several daemons in one process).
    pub fn open_with(
        identity: HostIdentity,
        state_dir: &std::path::Path,
        executor: Arc<dyn BundleExecutor>,
        shared_slots: Option<Arc<tokio::sync::Semaphore>>,
    ) -> anyhow::Result<Arc<Self>> {
        let state = StateDir::open(state_dir).context("opening the state directory")?;
        let records = Records::open(state_dir).context("opening the daemon records")?;
        // First of all: a second daemon on this state directory would
        // report the first one's runs interrupted and delete its downloads
        // (below), and both would follow the controller's orders, each
        // free to run a rollout the other has not recorded yet.
        let instance = records.lock_instance()?;
        // Bundles left running by a previous agent process are killed and
        // logged now, not at the next run. If that fails the daemon still
        // starts (kill switch and reporting keep working) and every run is
        // refused until recovery succeeds (the runner retries it first).
        let log = crate::run_log::RunLog::new(&state);
        match crate::recovery::recover_interrupted_runs(&state, &log) {
            Ok(runs) if !runs.is_empty() => {
                tracing::warn!(count = runs.len(), "recovered interrupted runs");
            }
            Ok(_) => {}
            Err(e) => tracing::error!(
                "recovering interrupted runs: {e}; runs are refused until it succeeds"
            ),
        }
        // Audit rules of runs whose agent died before recording them.
        match crate::kernel_audit::exit_rules::sweep_orphans() {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                count = n,
                "removed audit rules left behind by runs of a previous agent"
            ),
            Err(e) => tracing::warn!("cannot check for audit rules left behind: {e}"),
        }
        // Downloads of a previous process (a crash mid-download or mid-run;
        // up to 1 GiB each): no run of this process has begun, and none of
        // them runs again (their rollouts are reported interrupted below).
        match records.remove_downloads() {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                count = n,
                "removed downloads left by a previous agent process"
            ),
            Err(e) => tracing::warn!("cannot remove downloads left behind: {e}"),
        }
        let kill = KillSwitch::open(&state, &records)?;
        let mut unacked = BTreeSet::new();
        let all = records.all()?;
        for (id, why) in all.corrupt {
            replace_unreadable(&records, &identity.name, &id, &why);
            unacked.insert(id);
        }
        for mut rec in all.readable {
            if rec.phase == Phase::Started {
                tracing::warn!(rollout = %rec.rollout_id, "run was in progress when the agent stopped; reporting it interrupted");
                rec.phase = Phase::Finished;
                rec.report = Some(interrupted_report(&identity.name));
                rec.acked = false;
                records.put(&rec)?;
            }
            if !rec.acked {
                unacked.insert(rec.rollout_id.clone());
            }
        }
        Ok(Arc::new(Daemon {
            _instance: instance,
            identity,
            records,
            executor,
            kill,
            unacked: Mutex::new(unacked),
            undurable: Mutex::default(),
            outbox: Notify::new(),
            run_slots: tokio::sync::Semaphore::new(MAX_CONCURRENT_RUNS),
            shared_slots,
        }))
    }

    /// The kill switch: what is in force, and the runs it would kill.
    pub fn kill_switch(&self) -> &KillSwitch {
        &self.kill
    }

    fn finish(&self, id: &RolloutId, sha: &Sha256Hex, mut report: RunReport) {
        // What is recorded is what the controller will accept: a report it
        // refused for its size would be retried forever, holding back
        // every later one (a denial among them would never halt anything).
        if report.fit(MAX_REPORT_BYTES) {
            tracing::warn!(rollout = %id, "the run's report was cut to fit the controller's body limit");
        }
        let rec = HostRolloutRecord {
            rollout_id: id.clone(),
            bundle_sha256: Some(sha.clone()),
            phase: Phase::Finished,
            report: Some(report),
            acked: false,
        };
        if let Err(e) = self.records.put(&rec) {
            tracing::error!(rollout = %id, error = %e, "cannot record the run's report; sending it from memory");
            if let Some(report) = rec.report {
                // The first one kept is the run's: an `interrupted` one a
                // re-sent order makes later (the record still says
                // started) must not replace it.
                lock(&self.undurable).entry(id.clone()).or_insert(report);
            }
        }
        lock(&self.unacked).insert(id.clone());
        self.outbox.notify_one();
    }

    /// Handle a run order. `fetch` downloads the bundle to a path.
    pub async fn run_order<F, Fut>(
        self: Arc<Self>,
        id: RolloutId,
        sha: Sha256Hex,
        kind: RunKind,
        fetch: F,
    ) where
        F: FnOnce(PathBuf) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        // Not registered if already running in this process (its report
        // will come), or if the record says it was handled.
        let mut interrupted = false;
        let mut unreadable = None;
        let registered = self.kill.register(&id, || match self.records.get(&id) {
            Err(RecordError::Corrupt { why, .. }) => {
                // Reported below, once the run registry is unlocked.
                unreadable = Some(why);
                false
            }
            Err(e) => {
                tracing::error!(rollout = %id, error = %e, "cannot read the rollout record; not running it");
                false
            }
            Ok(Some(rec)) => {
                // Never a second run: answer from the record.
                tracing::info!(rollout = %id, phase = ?rec.phase, "order for a rollout already handled; re-sending its report");
                if rec.phase == Phase::Started {
                    // Reported below, once the run registry is unlocked.
                    interrupted = true;
                    return false;
                }
                lock(&self.unacked).insert(id.clone());
                self.outbox.notify_one();
                false
            }
            Ok(None) => true,
        });
        let Some(signal) = registered else {
            if interrupted {
                self.finish(&id, &sha, interrupted_report(&self.identity.name));
            }
            if let Some(why) = unreadable {
                replace_unreadable(&self.records, &self.identity.name, &id, &why);
                // Sent if it was replaced (a record still corrupt has no
                // report to send).
                lock(&self.unacked).insert(id.clone());
                self.outbox.notify_one();
            }
            return;
        };
        let result = match self.run_slots.acquire().await {
            Ok(_slot) => {
                let shared = match &self.shared_slots {
                    Some(s) => s.clone().acquire_owned().await.map(Some),
                    None => Ok(None),
                };
                match shared {
                    Ok(_shared) => {
                        self.clone()
                            .run_inner(&id, &sha, kind, signal.clone(), fetch)
                            .await
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        };
        // Over: a kill from now on has nothing left to kill.
        signal.finish();
        match result {
            Ok(report) => {
                // The record is several fsyncs: off the thread that reads
                // the orders, so a kill arriving while many runs end (a
                // kill ends them all at once) is not queued behind them.
                let me = self.clone();
                let (id2, sha2) = (id.clone(), sha.clone());
                if let Err(e) =
                    tokio::task::spawn_blocking(move || me.finish(&id2, &sha2, report)).await
                {
                    tracing::error!(rollout = %id, error = %e, "recording the report failed");
                }
            }
            Err(e) if e.downcast_ref::<BadDownload>().is_some() => {
                tracing::error!(rollout = %id, error = %e, "refusing the order");
                let mut r = base_report(&self.identity.name, RunStatus::Refused);
                r.refusal = Some(RefusalKind::BadBundle);
                r.reason = Some(e.to_string());
                r.denials = Some(vec![]);
                r.denial_count = Some(0);
                self.finish(&id, &sha, r);
            }
            Err(e) => {
                tracing::error!(rollout = %id, error = %e, "could not start the run; the controller will re-send the order")
            }
        }
        // Only now, with the outcome durable: while the run is registered
        // a re-sent order is answered "its report will come"; unregistered
        // earlier, the order would find the record still `Started` and
        // report the run interrupted, racing the real report.
        self.kill.unregister(&id);
    }

    async fn run_inner<F, Fut>(
        self: Arc<Self>,
        id: &RolloutId,
        sha: &Sha256Hex,
        kind: RunKind,
        signal: KillSignal,
        fetch: F,
    ) -> anyhow::Result<RunReport>
    where
        F: FnOnce(PathBuf) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        self.kill.durable().await;
        if let Some(order) = self.kill.covering(id) {
            return Ok(refused_report(&self.identity.name, &order));
        }
        let path = self.records.bundle_path(id);
        fetch(path.clone()).await?;
        if let Some(order) = self.kill.covering(id) {
            let _ = std::fs::remove_file(&path);
            return Ok(refused_report(&self.identity.name, &order));
        }
        // Durable before anything runs: from here on this rollout never
        // runs again on this host. (Its fsyncs off the thread that reads
        // the orders.)
        let started = HostRolloutRecord {
            rollout_id: id.clone(),
            bundle_sha256: Some(sha.clone()),
            phase: Phase::Started,
            report: None,
            acked: false,
        };
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.records.put(&started)).await??;
        tracing::info!(rollout = %id, bundle = %sha, ?kind, "running bundle");
        let me = self.clone();
        let id2 = id.clone();
        let p2 = path.clone();
        let report = tokio::task::spawn_blocking(move || me.executor.run(&p2, &id2, kind, signal))
            .await
            .unwrap_or_else(|e| {
                let mut r = interrupted_report(&self.identity.name);
                r.status = RunStatus::Failed;
                r.reason = Some(format!("the run crashed inside the agent: {e}"));
                r
            });
        let _ = std::fs::remove_file(&path);
        tracing::info!(rollout = %id, status = ?report.status, "run finished");
        Ok(report)
    }

    /// The report to send for `id`: its record's, or, if that could not be
    /// written, the one kept in memory. With the record, when there is one.
    fn report_to_send(&self, id: &RolloutId) -> Option<(RunReport, Option<HostRolloutRecord>)> {
        if let Some(report) = lock(&self.undurable).get(id) {
            return Some((report.clone(), None));
        }
        match self.records.get(id) {
            Ok(Some(r)) if r.phase == Phase::Finished => Some((r.report.clone()?, Some(r))),
            _ => None,
        }
    }

    /// Send every report the controller has not accepted yet.
    async fn flush_reports(&self, session: &ControllerSession) -> Result<(), TransportError> {
        let pending: Vec<RolloutId> = lock(&self.unacked).iter().cloned().collect();
        for id in pending {
            let Some((report, rec)) = self.report_to_send(&id) else {
                continue;
            };
            let body = serde_json::to_vec(&AgentReport {
                rollout_id: id.clone(),
                report,
            })
            .unwrap_or_default();
            match session
                .call(Method::POST, "/v1/agent/reports", Some(body), 64 * 1024)
                .await
            {
                Ok(_) => {}
                Err(TransportError::Status { status, body })
                    if status == hyper::StatusCode::NOT_FOUND
                        || status == hyper::StatusCode::BAD_REQUEST
                        || status == hyper::StatusCode::PAYLOAD_TOO_LARGE =>
                {
                    tracing::error!(rollout = %id, %status, %body, "controller rejected the report; dropping it");
                }
                Err(e) => return Err(e),
            }
            if let Some(mut acked) = rec {
                acked.acked = true;
                if let Err(e) = self.records.put(&acked) {
                    tracing::error!(rollout = %id, error = %e, "cannot record the report as delivered");
                }
            }
            lock(&self.undurable).remove(&id);
            lock(&self.unacked).remove(&id);
        }
        Ok(())
    }
}

/// A rollout record that cannot be read (a disk error, a hand edit): whether
/// its run happened is unknown. It is copied aside for the operator
/// (`<id>.json.corrupt`) and replaced, atomically, by a finished record
/// whose report says so, `interrupted` (an alarm: it halts the rollout).
/// At every moment `<id>.json` exists, corrupt or replaced, so the rollout
/// is never run; before, the daemon refused to start at all.
///
/// If even that fails (logged here), the record stays corrupt: the rollout
/// is still never run, and an order finds it unreadable and tries again.
fn replace_unreadable(records: &Records, host: &str, id: &RolloutId, why: &str) {
    let kept = records.keep_aside(id);
    tracing::error!(rollout = %id, kept = %kept.display(), %why, "the rollout's record is unreadable; reporting the rollout interrupted, never running it");
    let mut report = interrupted_report(host);
    report.reason = Some(format!(
        "the agent's record of this rollout could not be read ({why}; kept as {}): whether it ran is unknown, and it is not run again",
        kept.display()
    ));
    let replaced = records.put(&HostRolloutRecord {
        rollout_id: id.clone(),
        bundle_sha256: None,
        phase: Phase::Finished,
        report: Some(report),
        acked: false,
    });
    if let Err(e) = replaced {
        tracing::error!(rollout = %id, error = %e, "cannot replace the unreadable rollout record; not running it");
    }
}

fn base_report(host: &str, status: RunStatus) -> RunReport {
    RunReport::new(host, status)
}

fn interrupted_report(host: &str) -> RunReport {
    let mut r = base_report(host, RunStatus::Interrupted);
    r.reason = Some("the agent stopped while this run was in progress; it is not run again".into());
    r
}

impl LocalControl for Daemon {
    fn handle(&self, req: LocalRequest) -> LocalResponse {
        let mut resp = LocalResponse {
            ok: true,
            error: None,
            killed: 0,
            running: vec![],
            kill: Default::default(),
        };
        let result: anyhow::Result<()> = (|| {
            match req {
                LocalRequest::Kill { reason } => resp.killed = self.kill.local_kill(reason)?,
                LocalRequest::Lift => self.kill.lift_local()?,
                LocalRequest::Status => {}
            }
            Ok(())
        })();
        if let Err(e) = result {
            resp.ok = false;
            resp.error = Some(format!("{e:#}"));
            // Whatever failed, a kill request still kills.
            resp.killed = self.kill.kill_covered();
        }
        resp.running = self.kill.running().iter().map(|r| r.to_string()).collect();
        resp.kill = self.kill.snapshot();
        resp
    }
}

/// How often the daemon looks for audit rules of runs that are over.
const ORPHAN_SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(600);

/// A run's audit rules are removed by a detached process after the run
/// (`kernel_audit::janitor`); if that process is killed first, the rule
/// stays, and while any rule exists every process on the host takes
/// audit's slow path. The daemon's start removes such orphans; this looks
/// again every [`ORPHAN_SWEEP_INTERVAL`] while it runs. Rules of runs still
/// going are kept (their session has live processes).
async fn sweep_orphan_audit_rules() {
    let mut every = tokio::time::interval(ORPHAN_SWEEP_INTERVAL);
    // The first tick is immediate: `Daemon::open` has just swept.
    every.tick().await;
    loop {
        every.tick().await;
        match tokio::task::spawn_blocking(crate::kernel_audit::exit_rules::sweep_orphans).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::warn!(
                count = n,
                "removed audit rules left behind by finished runs"
            ),
            Ok(Err(e)) => tracing::warn!("cannot check for audit rules left behind: {e}"),
            Err(e) => tracing::warn!("audit rule sweep failed: {e}"),
        }
    }
}

/// Run the daemon until the process is stopped.
pub fn serve(
    identity: HostIdentity,
    state_dir: &std::path::Path,
    controller: &ControllerSection,
    executor: Arc<dyn BundleExecutor>,
    opts: &DaemonOptions,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        // The daemon first (it takes the state directory's lock): the
        // transport finishes an interrupted certificate renewal, which
        // must not happen under a running daemon's feet.
        let daemon = Daemon::open(identity, state_dir, executor)?;
        let transport = Transport::new(controller)?;
        let listener = local::bind(&opts.socket)
            .with_context(|| format!("binding {}", opts.socket.display()))?;
        tokio::spawn(local::serve(listener, daemon.clone()));
        tokio::spawn(sweep_orphan_audit_rules());
        tracing::info!(socket = %opts.socket.display(), "local control socket ready");
        // State open and the local socket (kill switch) bound: ready for
        // systemd (Type=notify), even while the controller is unreachable.
        // Outside systemd this does nothing.
        if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
            tracing::warn!(error = %e, "could not notify the service manager");
        }
        daemon.run_forever(transport).await;
        anyhow::Ok(())
    })
}

/// `rollguard-agent serve --policy PATH`: load the policy and its
/// `[controller]` section, run the daemon with the real runner.
pub fn serve_policy(policy_path: &std::path::Path, opts: &DaemonOptions) -> anyhow::Result<()> {
    let policy = crate::policy::HostPolicy::load(policy_path)?;
    let controller = policy.controller().cloned().ok_or_else(|| {
        anyhow::anyhow!(
            "{}: the policy has no [controller] section (url, ca, cert, key): `serve` needs one",
            policy_path.display()
        )
    })?;
    let agent_exe = std::env::current_exe().context("locating the rollguard-agent binary")?;
    let identity = policy.identity();
    let state_dir = policy.state_dir().to_path_buf();
    let launcher = open_launcher(&agent_exe);
    let executor = Arc::new(RunnerExecutor {
        policy,
        agent_exe,
        launcher,
    });
    serve(identity, &state_dir, &controller, executor, opts)
}

/// The stage-2 program, opened and checked once for the daemon's lifetime:
/// every run executes that file, whatever happens to its path later. If it
/// is missing or unsafe now, runs look again each time (and are refused
/// until it is fixed), so a fixed install needs no restart.
pub fn open_launcher(agent_exe: &std::path::Path) -> Option<crate::sandbox::Launcher> {
    match crate::sandbox::Launcher::beside(agent_exe) {
        Ok(l) => {
            tracing::info!(program = %l.stage2_exe().display(), "stage-2 program opened and checked");
            Some(l)
        }
        Err(e) => {
            tracing::error!("no usable stage-2 program; every run is refused until there is: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests;
