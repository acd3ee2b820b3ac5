//! The agent's kill switch: everything that stops bundles on this host and
//! refuses new ones while a kill order is in force.
//!
//! Kill orders come from two places: the controller (the fleet's kill
//! state: fleet-wide and per-rollout kills, replaced as a whole by each
//! new generation) and this host (`rollguard-agent kill` over the daemon's
//! local socket; lifted only there). [`KillSwitch`] is the daemon's one
//! handle on all of it:
//!
//! - what is in force, in memory ([`KillSwitch::covering`],
//!   [`KillSwitch::host_wide`]);
//! - its durable storage ([`store`]): the daemon's record, and the state
//!   directory's host-wide switch, kept in step with it, which the runner
//!   itself checks ([`host_kill_in_force`]) so even a manual
//!   `rollguard-agent run` is refused while a fleet-wide or local kill is
//!   in force;
//! - the running runs' kill signals ([`signal`]): registered before a run
//!   starts, killed (`cgroup.kill`, through the sandbox hook) when an order
//!   covers them;
//! - "durable before acknowledged": a fleet kill is enforced in memory at
//!   once and written afterwards; new runs wait until every state enforced
//!   so far is durable ([`KillSwitch::durable`]).
//!
//! The daemon (`crate::daemon`) only routes orders and local requests
//! here. The kill mechanism itself (`cgroup.kill` of a run's cgroup) is the
//! sandbox's ([`crate::sandbox::KillHandle`]).

pub mod offline;
pub mod signal;
pub mod store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::Context;
use rollguard_shared::protocol::{KillOrder, KillState, RolloutId};
use rollguard_shared::report::{RefusalKind, RunReport, RunStatus};

use crate::daemon::records::Records;
use crate::state::StateDir;

pub use signal::KillSignal;
pub use store::{host_kill_in_force, HostKill, KillFile};

/// Now, as kill orders record it.
pub(crate) fn now() -> String {
    jiff::Timestamp::now().to_string()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The daemon's kill switch: the kill state in force, its storage, and the
/// kill signals of the runs in progress.
pub struct KillSwitch {
    state: StateDir,
    /// Where the daemon's record is kept ([`Records::dir`]).
    daemon_dir: std::path::PathBuf,
    kill: Mutex<KillFile>,
    /// The runs in progress in this process, by rollout.
    running: Mutex<HashMap<RolloutId, KillSignal>>,
    /// Fleet kill states enforced in memory so far (see
    /// [`KillSwitch::enforce_fleet`]) ...
    changes: AtomicU64,
    /// ... and how many of them are durable; runs wait for the two to meet.
    durable: tokio::sync::watch::Sender<u64>,
    /// Serializes writes of the kill state, so the newest state is the one
    /// renamed into place last.
    persist: Mutex<()>,
}

impl KillSwitch {
    /// Recover the kill state: the daemon's record (a corrupt one counts as
    /// a local kill in force), plus a host-wide switch set without the
    /// daemon; then write both files so they agree.
    pub fn open(state: &StateDir, records: &Records) -> anyhow::Result<Self> {
        let daemon_dir = records.dir().to_path_buf();
        let kill = in_force(state, &daemon_dir)?;
        store::save_daemon_kill(&daemon_dir, &kill)?;
        let switch = KillSwitch {
            state: state.clone(),
            daemon_dir,
            kill: Mutex::new(kill),
            running: Mutex::new(HashMap::new()),
            changes: AtomicU64::new(0),
            durable: tokio::sync::watch::Sender::new(0),
            persist: Mutex::new(()),
        };
        switch.sync_host_kill()?;
        Ok(switch)
    }

    /// Make the state directory's kill switch match our host-wide kill.
    fn sync_host_kill(&self) -> anyhow::Result<()> {
        let wanted = lock(&self.kill).host_wide().cloned();
        let current = store::host_kill_in_force(&self.state)?;
        match (wanted, current) {
            (Some(order), None) => {
                store::set_host_kill(&self.state, &format!("{} (by {})", order.reason, order.by))?;
            }
            (None, Some(_)) => store::clear_host_kill(&self.state)?,
            _ => {}
        }
        Ok(())
    }

    /// Everything in force now.
    pub fn snapshot(&self) -> KillFile {
        lock(&self.kill).clone()
    }

    /// The order that forbids running `rollout` now, if any.
    pub fn covering(&self, rollout: &RolloutId) -> Option<KillOrder> {
        lock(&self.kill).covering(rollout).cloned()
    }

    /// The order that forbids running anything now, if any.
    pub fn host_wide(&self) -> Option<KillOrder> {
        lock(&self.kill).host_wide().cloned()
    }

    // ---- the runs in progress ------------------------------------------

    /// Register a run of `id` and return its kill signal, unless `id` is
    /// running in this process already or `admit` says no. `admit` is
    /// called with the registry locked, so of two orders for one rollout at
    /// once only one can be admitted.
    pub fn register(&self, id: &RolloutId, admit: impl FnOnce() -> bool) -> Option<KillSignal> {
        let signal = KillSignal::new();
        let mut running = lock(&self.running);
        if running.contains_key(id) || !admit() {
            return None;
        }
        running.insert(id.clone(), signal.clone());
        Some(signal)
    }

    /// The run of `id` is over.
    pub fn unregister(&self, id: &RolloutId) {
        lock(&self.running).remove(id);
    }

    /// The rollouts running now (not those whose run is over and whose
    /// outcome is being recorded).
    pub fn running(&self) -> Vec<RolloutId> {
        lock(&self.running)
            .iter()
            .filter(|(_, s)| !s.is_finished())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Kill every running bundle covered by the current kill state;
    /// returns how many.
    pub fn kill_covered(&self) -> u32 {
        let kill = lock(&self.kill).clone();
        let running = lock(&self.running);
        let mut n = 0;
        for (id, signal) in running.iter() {
            if kill.covering(id).is_some() && !signal.is_finished() {
                tracing::warn!(rollout = %id, "killing running bundle (kill order in force)");
                signal.kill();
                n += 1;
            }
        }
        n
    }

    // ---- the fleet's kill state ----------------------------------------

    /// A new fleet kill state from the controller, enforced and made
    /// durable. Returns the number of bundles killed.
    pub fn apply_fleet(&self, state: KillState) -> anyhow::Result<u32> {
        let killed = self.enforce_fleet(state);
        self.persist()?;
        Ok(killed)
    }

    /// Enforce a new fleet kill state at once, in memory: covered running
    /// bundles are killed now, new runs see it. Returns how many were
    /// killed. It is not durable until [`KillSwitch::persist`]; until then
    /// runs wait ([`KillSwitch::durable`]), so a lift never lets a run
    /// start that the state directory's kill switch would still refuse, and
    /// a crash before persisting leaves the older state, which the
    /// controller re-sends first on reconnect.
    ///
    /// Killing before writing is the safe order for a kill: the write is
    /// several fsyncs, and a kill must not wait for the disk (at 10,000
    /// hosts in one process it was seconds; see docs/scale.md).
    pub fn enforce_fleet(&self, state: KillState) -> u32 {
        {
            let mut kill = lock(&self.kill);
            kill.fleet = state;
            self.changes.fetch_add(1, Ordering::SeqCst);
        }
        self.kill_covered()
    }

    /// Write the kill state in force (daemon record, then the state
    /// directory's kill switch), durably. Blocking.
    ///
    /// Every change (fleet or local) is written through here, one writer
    /// at a time, from its read of the state to its last write: writers
    /// that interleaved could leave the files older than memory (a fleet
    /// lift written from a snapshot taken before a local kill could clear
    /// the state directory's kill switch after the local kill set it, and
    /// a manual `rollguard-agent run`, which reads only that file, would
    /// run). The last writer reads the newest state, so the files always
    /// end where memory is.
    pub fn persist(&self) -> anyhow::Result<()> {
        let _one_writer = lock(&self.persist);
        let (kill, epoch) = {
            let kill = lock(&self.kill);
            (kill.clone(), self.changes.load(Ordering::SeqCst))
        };
        store::save_daemon_kill(&self.daemon_dir, &kill)?;
        self.sync_host_kill()?;
        self.durable.send_modify(|d| *d = (*d).max(epoch));
        Ok(())
    }

    /// Wait until every kill state enforced so far is durable.
    pub async fn durable(&self) {
        let wanted = self.changes.load(Ordering::SeqCst);
        let mut rx = self.durable.subscribe();
        let _ = rx.wait_for(|d| *d >= wanted).await;
    }

    // ---- this host's own kill ------------------------------------------

    /// `rollguard-agent kill --reason`: put a local kill in force, kill
    /// every covered bundle at once (a kill does not wait for the disk, as
    /// in [`KillSwitch::enforce_fleet`]), then write it down durably
    /// before returning. Returns how many were killed. On an error the
    /// kill is in force in memory (the daemon refuses every run) and its
    /// bundles are killed; the error says the files could not be written.
    pub fn local_kill(&self, reason: String) -> anyhow::Result<u32> {
        {
            let mut kill = lock(&self.kill);
            kill.local = Some(KillOrder {
                reason,
                by: "local".into(),
                at: now(),
            });
        }
        let killed = self.kill_covered();
        self.persist()?;
        Ok(killed)
    }

    /// `rollguard-agent kill --lift`: lift the local kill (a fleet kill
    /// stays until the controller lifts it), then write it down. If that
    /// fails, the state directory's switch still refuses manual runs (the
    /// safe side), and the error says so.
    pub fn lift_local(&self) -> anyhow::Result<()> {
        lock(&self.kill).local = None;
        self.persist()
    }
}

/// What is in force on this host, from its two files: the daemon's record
/// in `daemon_dir` (a corrupt one counts as a local kill in force), plus a
/// host-wide switch set without the daemon (`rollguard-agent kill` while it
/// was stopped), adopted as a local kill, never silently cleared. What the
/// daemon recovers at its start, and what `kill` without a daemon acts on
/// ([`offline`]).
pub(crate) fn in_force(state: &StateDir, daemon_dir: &std::path::Path) -> anyhow::Result<KillFile> {
    let mut kill = match store::load_daemon_kill(daemon_dir) {
        Ok(k) => k,
        Err(e) => {
            tracing::error!(error = %e, "kill state unreadable: treating it as a local kill in force");
            KillFile {
                fleet: KillState::default(),
                local: Some(KillOrder {
                    reason: format!("unreadable kill state ({e})"),
                    by: "local".into(),
                    at: now(),
                }),
            }
        }
    };
    if kill.host_wide().is_none() {
        if let Some(order) = store::host_kill_in_force(state).context("reading the kill switch")? {
            kill.local = Some(KillOrder {
                reason: order.reason,
                by: "local".into(),
                at: now(),
            });
        }
    }
    Ok(kill)
}

/// The report of a run refused because `order` is in force.
pub fn refused_report(host: &str, order: &KillOrder) -> RunReport {
    let mut r = RunReport::new(host, RunStatus::Refused);
    r.refusal = Some(RefusalKind::KillSwitch);
    r.reason = Some(format!(
        "a kill order is in force: {} (by {})",
        order.reason, order.by
    ));
    r.denials = Some(vec![]);
    r.denial_count = Some(0);
    r
}

#[cfg(test)]
mod tests;
