//! Service actions, performed by the agent itself, outside the sandbox,
//! after a run succeeded (issue 13; docs/services.md).
//!
//! - [`broker`]: reloads and restarts through systemd's D-Bus API, one job
//!   per unit, each awaited to its result.
//! - [`stale`]: the processes still running code the run's packages
//!   replaced, and the restarts that would end that.
//!
//! What may be acted upon is decided before: declared units against the
//! host's `[services] allow` before the run, captured requests after it.
//! This module performs a plan it is given; it never widens it.

pub mod after_run;
pub mod broker;
pub mod capture;
pub mod stale;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use rollguard_shared::services::{
    PlannedAction, ServiceOutcome, StaleService, UnitName, AGENT_UNIT,
};

pub use broker::{perform, Bus, DEFAULT_JOB_TIMEOUT};

/// The agent's own units: `rollguard-agent.service`, as packaged, and the
/// unit this process runs in if it is another (a renamed copy of the
/// unit). A run never reloads or restarts them, whoever asks and whatever
/// `allow` says: stopping the agent would end the run that is reporting,
/// after its outcome was recorded and before its report was sent.
pub fn own_units() -> Vec<UnitName> {
    let mut own: Vec<UnitName> = UnitName::parse(AGENT_UNIT).into_iter().collect();
    let current = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|c| stale::unit_from_cgroup(&c));
    own.extend(current.filter(|u| !own.contains(u)));
    own
}

/// What [`perform_all`] needs besides the plan.
pub struct ServiceRun<'a> {
    pub bus: &'a Bus,
    /// Per job (connecting included): past it the unit's result is
    /// `timeout` and the run fails.
    pub timeout: Duration,
    /// Absolute paths the run's packages replaced or removed.
    pub replaced: &'a BTreeSet<PathBuf>,
    /// `restart_stale`: the host's allow list, to restart the stale units
    /// it permits; `None` when the bundle did not ask for it.
    pub restart_stale: Option<&'a dyn Fn(&UnitName) -> bool>,
    /// The units an alias in the plan may lead to: the host's allow list
    /// less the agent's own units (see [`broker::perform`]).
    pub permits: &'a dyn Fn(&UnitName) -> bool,
}

/// The whole after-run step: find the processes still mapping replaced
/// files, add the allowed stale units to `plan` (with `restart_stale`),
/// perform everything, then look again.
///
/// The stale list returned is the second look: what still runs old code
/// once the agent is done (a unit restarted by the plan no longer appears;
/// one outside `allow`, or not asked for, does). That is what an operator
/// has left to do on this host.
pub fn perform_all(
    run: &ServiceRun<'_>,
    plan: &[PlannedAction],
) -> (Vec<ServiceOutcome>, Vec<StaleService>) {
    let mut plan = plan.to_vec();
    if !run.replaced.is_empty() {
        if let Some(allow) = run.restart_stale {
            let found = stale::scan(run.replaced);
            plan.extend(stale::restart_plan(&found, allow));
        }
    }
    let outcomes = perform(run.bus, &plan, run.timeout, run.permits);
    let still = if run.replaced.is_empty() {
        Vec::new()
    } else {
        stale::scan(run.replaced)
    };
    (outcomes, still)
}
