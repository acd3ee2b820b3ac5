//! How the daemon runs one bundle: through [`crate::runner::run_bundle`],
//! exactly as `rollguard-agent run` does, behind a small trait so the
//! daemon's ordering, dedupe and kill logic can be tested with a fake.

use std::path::{Path, PathBuf};

use rollguard_shared::protocol::RolloutId;
use rollguard_shared::report::RunReport;

use crate::kill_switch::KillSignal;
use crate::policy::HostPolicy;
use crate::runner::{run_bundle, RunOptions};

/// Runs one bundle to completion (blocking) and reports.
pub trait BundleExecutor: Send + Sync + 'static {
    fn run(
        &self,
        bundle: &Path,
        rollout_id: &RolloutId,
        kind: RunKind,
        kill: KillSignal,
    ) -> RunReport;
}

/// What an order asks for: a run for real or a preview of it
/// ([`rollguard_shared::protocol::Order::Preview`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    Real,
    Preview,
    /// For real, as a retry (`Order::Run` with `retry`): see
    /// [`crate::runner::RunOptions::retry`].
    Retry,
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
    fn run(
        &self,
        bundle: &Path,
        rollout_id: &RolloutId,
        kind: RunKind,
        kill: KillSignal,
    ) -> RunReport {
        let opts = RunOptions {
            agent_exe: self.agent_exe.clone(),
            rollout_id: Some(rollout_id.to_string()),
            on_start: Some(kill.sandbox_hook()),
            launcher: self.launcher.clone(),
            preview: kind == RunKind::Preview,
            retry: kind == RunKind::Retry,
        };
        run_bundle(&self.policy, bundle, &opts)
    }
}
