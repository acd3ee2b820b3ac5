//! How the daemon runs one bundle: through [`crate::runner::run_bundle`],
//! exactly as `rollguard-agent run` does, behind a small trait so the
//! daemon's ordering, dedupe and kill logic can be tested with a fake.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rollguard_shared::protocol::RolloutId;
use rollguard_shared::report::RunReport;

use crate::policy::HostPolicy;
use crate::runner::{run_bundle, RunOptions};

type Killer = Box<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct Slot {
    killed: bool,
    killer: Option<Killer>,
}

/// The kill switch of one run. The daemon holds it from before the run
/// starts; the executor attaches the real killer (the run's cgroup.kill)
/// once the bundle is running. A kill that comes first is remembered and
/// applied the moment the killer is attached, so there is no window in
/// which a started bundle cannot be killed.
#[derive(Clone, Default)]
pub struct KillSignal(Arc<Mutex<Slot>>);

impl KillSignal {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn attach(&self, killer: Killer) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if slot.killed {
            killer();
        }
        slot.killer = Some(killer);
    }

    pub fn kill(&self) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        slot.killed = true;
        if let Some(k) = &slot.killer {
            k();
        }
    }

    pub fn is_killed(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).killed
    }
}

/// Runs one bundle to completion (blocking) and reports.
pub trait BundleExecutor: Send + Sync + 'static {
    fn run(&self, bundle: &Path, rollout_id: &RolloutId, kill: KillSignal) -> RunReport;
}

/// The real executor: the agent's runner with the host policy.
pub struct RunnerExecutor {
    pub policy: HostPolicy,
    /// The `rollguard-agent` binary (stage 2 of the sandbox).
    pub agent_exe: PathBuf,
    /// The stage-2 program, opened and checked when the daemon started
    /// ([`crate::sandbox::Launcher::current`]); `None` if that failed, and
    /// then each run looks again (and is refused while it is missing).
    pub launcher: Option<crate::sandbox::Launcher>,
}

impl BundleExecutor for RunnerExecutor {
    fn run(&self, bundle: &Path, rollout_id: &RolloutId, kill: KillSignal) -> RunReport {
        let on_start = {
            let kill = kill.clone();
            Arc::new(move |run_id: &str, handle: crate::sandbox::KillHandle| {
                let run_id = run_id.to_string();
                kill.attach(Box::new(move || {
                    if let Err(e) = handle.kill() {
                        tracing::error!(run = %run_id, error = %e, "cgroup.kill failed");
                    }
                }));
            })
        };
        let opts = RunOptions {
            agent_exe: self.agent_exe.clone(),
            rollout_id: Some(rollout_id.to_string()),
            on_start: Some(on_start),
            launcher: self.launcher.clone(),
        };
        run_bundle(&self.policy, bundle, &opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_kill_before_attach_is_applied_on_attach() {
        let hits = Arc::new(AtomicUsize::new(0));
        let s = KillSignal::new();
        s.kill();
        let h = hits.clone();
        s.attach(Box::new(move || {
            h.fetch_add(1, Ordering::SeqCst);
        }));
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        s.kill();
        assert_eq!(hits.load(Ordering::SeqCst), 2);
        assert!(s.is_killed());
        let fresh = KillSignal::new();
        assert!(!fresh.is_killed());
    }
}
