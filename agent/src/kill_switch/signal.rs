//! The kill switch of one run: the hook between the kill logic and the
//! sandbox's `cgroup.kill` ([`crate::sandbox::KillHandle`]).
//!
//! The daemon creates a run's [`KillSignal`] before the run starts (a kill
//! order may arrive while the bundle is still downloading); the sandbox only
//! has something to kill once the bundle is running. The signal bridges the
//! two: a kill that comes first is remembered and applied the moment the
//! killer is attached, so there is no window in which a started bundle
//! cannot be killed.

use std::sync::{Arc, Mutex};

use crate::runner::OnStart;
use crate::sandbox::KillHandle;

type Killer = Box<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct Slot {
    killed: bool,
    killer: Option<Killer>,
    /// The run is over (its outcome is being recorded): nothing to kill.
    finished: bool,
}

/// The kill switch of one run. The daemon holds it from before the run
/// starts; the executor attaches the real killer (the run's cgroup.kill,
/// see [`KillSignal::sandbox_hook`]) once the bundle is running. A kill
/// that comes first is remembered and applied the moment the killer is
/// attached.
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
        if slot.finished {
            return;
        }
        slot.killed = true;
        if let Some(k) = &slot.killer {
            k();
        }
    }

    /// The run is over: its sandbox (and cgroup) are gone, so a kill from
    /// now on has nothing to kill and does not count as one.
    pub fn finish(&self) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        slot.finished = true;
        slot.killer = None;
    }

    pub fn is_finished(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).finished
    }

    pub fn is_killed(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).killed
    }

    /// The runner's start hook ([`crate::runner::RunOptions::on_start`])
    /// that attaches the sandbox's kill handle of the run to this signal:
    /// from then on a kill is the run cgroup's `cgroup.kill`.
    pub fn sandbox_hook(&self) -> OnStart {
        let kill = self.clone();
        Arc::new(move |run_id: &str, handle: KillHandle| {
            let run_id = run_id.to_string();
            kill.attach(Box::new(move || {
                if let Err(e) = handle.kill() {
                    tracing::error!(run = %run_id, error = %e, "cgroup.kill failed");
                }
            }));
        })
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

    #[test]
    fn a_finished_run_has_nothing_to_kill() {
        let hits = Arc::new(AtomicUsize::new(0));
        let s = KillSignal::new();
        let h = hits.clone();
        s.attach(Box::new(move || {
            h.fetch_add(1, Ordering::SeqCst);
        }));
        s.finish();
        s.kill();
        assert_eq!(hits.load(Ordering::SeqCst), 0, "its cgroup is gone");
        assert!(s.is_finished() && !s.is_killed());
    }
}
