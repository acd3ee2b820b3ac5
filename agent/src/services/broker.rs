//! The service broker: performs reloads and restarts through systemd's
//! D-Bus API and waits for each job's result.
//!
//! Why D-Bus and not `systemctl`: the result of a job arrives as data
//! (`JobRemoved`'s `result`), not as an exit status and a message for
//! people; the unit's `MainPID` is read the same way; and there is no
//! child process, PATH or locale between the agent and systemd.
//!
//! Why a client of our own and not a crate of systemd bindings: a few
//! calls and one signal are all the broker uses; zbus's `#[proxy]` macro types
//! them here, in one screen.
//!
//! The runner is synchronous (the daemon calls it on a blocking thread), so
//! [`perform`] drives the async zbus client on a current-thread Tokio
//! runtime of its own, for the length of the call.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rollguard_shared::services::{PlannedAction, ServiceAction, ServiceOutcome, UnitName};
use zbus::proxy::CacheProperties;
use zbus::zvariant::OwnedObjectPath;

/// How long one job may take (connecting to the bus included) before the
/// broker stops waiting and reports `timeout`. systemd's own default start
/// and stop timeouts are 90 s each (`DefaultTimeoutStartSec=`).
pub const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(90);

/// How long all of one run's actions may take together: each job has
/// [`DEFAULT_JOB_TIMEOUT`] (or what is left of this), and the actions not
/// yet begun when it is over are not performed (their result says so, and
/// the run fails). A plan is one action per unit, but an allow list of
/// globs may hold many units, and a run must not hold its slot for hours.
pub const PLAN_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// The result of an action not begun because [`PLAN_TIMEOUT`] was over.
pub const NOT_BEGUN: &str =
    "error: not performed: the run's service actions took longer than 15 minutes altogether";

/// The job mode: queue after, or replace, conflicting jobs, as `systemctl`
/// does by default. "fail" would refuse a restart while an unrelated job
/// for the unit is queued.
const JOB_MODE: &str = "replace";

/// Which bus systemd is reached on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bus {
    /// `unix:path=/run/dbus/system_bus_socket`.
    System,
    /// A D-Bus address (`unix:path=...`): `DBUS_SYSTEM_BUS_ADDRESS`, or a
    /// test's container.
    Address(String),
}

impl Bus {
    /// `DBUS_SYSTEM_BUS_ADDRESS` if set and not empty, else the standard
    /// system bus (what `systemctl` does too).
    pub fn from_env() -> Self {
        match std::env::var("DBUS_SYSTEM_BUS_ADDRESS") {
            Ok(a) if !a.is_empty() => Bus::Address(a),
            _ => Bus::System,
        }
    }
}

impl std::fmt::Display for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bus::System => f.write_str("the system bus"),
            Bus::Address(a) => write!(f, "the bus at {a}"),
        }
    }
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait Manager {
    /// Without a subscriber, systemd may not emit job signals at all.
    fn subscribe(&self) -> zbus::Result<()>;
    /// The unit's object, loading its file if it is not loaded yet.
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    /// `systemctl daemon-reload`: every unit file read again; the reply
    /// comes once that is done.
    fn reload(&self) -> zbus::Result<()>;
    #[zbus(signal)]
    fn job_removed(&self, id: u32, job: OwnedObjectPath, unit: String, result: String);
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
trait Unit {
    #[zbus(property)]
    fn load_state(&self) -> zbus::Result<String>;
    /// The unit's own name, which differs from the one it was loaded by
    /// when that is an alias.
    #[zbus(property)]
    fn id(&self) -> zbus::Result<String>;
    /// Its file (or a drop-in) changed on disk since systemd read it.
    #[zbus(property)]
    fn need_daemon_reload(&self) -> zbus::Result<bool>;
    // The jobs, on the unit object itself: on the unit whose `Id` was
    // checked, never on whatever its name points to by then.
    fn reload(&self, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn restart(&self, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn try_restart(&self, mode: &str) -> zbus::Result<OwnedObjectPath>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Service",
    default_service = "org.freedesktop.systemd1"
)]
trait Service {
    #[zbus(property, name = "MainPID")]
    fn main_pid(&self) -> zbus::Result<u32>;
}

/// Strength of an action, to merge several for one unit: a restart
/// includes what a try-restart does, and both make a reload pointless
/// (the new process reads its configuration anew).
fn strength(a: ServiceAction) -> u8 {
    match a {
        ServiceAction::Reload => 0,
        ServiceAction::TryRestart => 1,
        ServiceAction::Restart => 2,
    }
}

/// One action per unit, in the order each unit first appears in `plan`,
/// each with the strongest action asked for it (and the source of the
/// first entry that asked for that one). A service is restarted once,
/// however many declarations, package scripts and stale processes asked,
/// like Ansible's handlers; and after everything asked for it ran.
pub fn merge(plan: &[PlannedAction]) -> Vec<PlannedAction> {
    let mut out: Vec<PlannedAction> = Vec::new();
    let mut index: BTreeMap<&UnitName, usize> = BTreeMap::new();
    for p in plan {
        match index.get(&p.unit) {
            Some(&i) => {
                if strength(p.action) > strength(out[i].action) {
                    out[i].action = p.action;
                    out[i].source = p.source.clone();
                }
            }
            None => {
                index.insert(&p.unit, out.len());
                out.push(p.clone());
            }
        }
    }
    out
}

/// Perform `plan` (merged by [`merge`]) on `bus`, one unit after the other,
/// and say what came of each. Never panics and never gives up early: a unit
/// that fails, or a bus that cannot be reached, is an outcome whose result
/// says so, and the next unit is still tried (each restart is independent;
/// the caller fails the run on any unsuccessful outcome).
///
/// `permits` decides a unit a name turns out to be an alias of: the plan's
/// names were checked against the host's allow list, the unit an alias
/// leads to was not (the host's allow list less the agent's own units).
pub fn perform(
    bus: &Bus,
    plan: &[PlannedAction],
    timeout: Duration,
    permits: &dyn Fn(&UnitName) -> bool,
) -> Vec<ServiceOutcome> {
    let actions = merge(plan);
    if actions.is_empty() {
        return Vec::new();
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let why = format!("error: cannot start the D-Bus client: {e}");
            return actions.iter().map(|a| failed(a, &why, None, 0)).collect();
        }
    };
    runtime.block_on(perform_async(bus, &actions, timeout, permits))
}

async fn perform_async(
    bus: &Bus,
    actions: &[PlannedAction],
    timeout: Duration,
    permits: &dyn Fn(&UnitName) -> bool,
) -> Vec<ServiceOutcome> {
    let started = Instant::now();
    let manager = match tokio::time::timeout(timeout, connect(bus, timeout)).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            tracing::error!(%bus, error = %e, "cannot reach systemd");
            let why = format!("error: cannot reach systemd on {bus}: {e}");
            let ms = started.elapsed().as_millis() as u64;
            return actions.iter().map(|a| failed(a, &why, None, ms)).collect();
        }
        Err(_) => {
            tracing::error!(%bus, "timed out connecting to systemd");
            let ms = started.elapsed().as_millis() as u64;
            return actions
                .iter()
                .map(|a| failed(a, "timeout", None, ms))
                .collect();
        }
    };
    let deadline = started + PLAN_TIMEOUT;
    let mut out = Vec::with_capacity(actions.len());
    for a in actions {
        let left = deadline.saturating_duration_since(Instant::now());
        let outcome = if left.is_zero() {
            failed(a, NOT_BEGUN, None, 0)
        } else {
            perform_one(&manager, a, timeout.min(left), permits).await
        };
        tracing::info!(
            unit = %outcome.unit,
            action = outcome.action.as_str(),
            source = ?outcome.source,
            result = %outcome.result,
            main_pid_before = ?outcome.main_pid_before,
            main_pid_after = ?outcome.main_pid_after,
            duration_ms = outcome.duration_ms,
            "service action"
        );
        out.push(outcome);
    }
    out
}

async fn connect(bus: &Bus, timeout: Duration) -> zbus::Result<ManagerProxy<'static>> {
    let builder = match bus {
        Bus::System => zbus::connection::Builder::system()?,
        Bus::Address(a) => zbus::connection::Builder::address(a.as_str())?,
    };
    // A method call that never returns must not hold the run forever.
    let conn = builder.method_timeout(timeout).build().await?;
    let manager = ManagerProxy::new(&conn).await?;
    manager.subscribe().await?;
    Ok(manager)
}

/// Why one action did not reach a job result.
enum Stop {
    Call(zbus::Error),
    NotLoaded(String),
    /// The name is an alias of this unit.
    Alias(String),
    SignalStreamEnded,
}

async fn perform_one(
    manager: &ManagerProxy<'static>,
    a: &PlannedAction,
    timeout: Duration,
    permits: &dyn Fn(&UnitName) -> bool,
) -> ServiceOutcome {
    let started = Instant::now();
    if !a.unit.is_service() {
        return failed(
            a,
            "error: only .service units are reloaded or restarted",
            None,
            0,
        );
    }
    let mut progress = Progress::default();
    let job = run_job(manager, a, permits, &mut progress);
    let result = match tokio::time::timeout(timeout, job).await {
        Ok(Ok(result)) => result,
        Ok(Err(Stop::Call(e))) => format!("error: {e}"),
        Ok(Err(Stop::NotLoaded(state))) => {
            format!("error: systemd has no loadable unit {} ({state})", a.unit)
        }
        Ok(Err(Stop::Alias(id))) => format!(
            "error: {} is an alias of {id}, which this host's [services] allow does not permit (or which is the agent's own unit)",
            a.unit
        ),
        Ok(Err(Stop::SignalStreamEnded)) => {
            "error: the bus closed before the job finished".to_string()
        }
        // The job may still complete in systemd; the run has failed either
        // way (docs/services.md). It is not cancelled: a restart cancelled
        // between its stop and its start would leave the unit stopped.
        Err(_) => "timeout".to_string(),
    };
    ServiceOutcome {
        unit: a.unit.clone(),
        action: a.action,
        source: a.source.clone(),
        result,
        main_pid_before: progress.before,
        main_pid_after: progress.after,
        duration_ms: started.elapsed().as_millis() as u64,
        daemon_reloaded: progress.daemon_reloaded,
    }
}

async fn run_job(
    manager: &ManagerProxy<'static>,
    a: &PlannedAction,
    permits: &dyn Fn(&UnitName) -> bool,
    progress: &mut Progress,
) -> Result<String, Stop> {
    let name = a.unit.as_str();
    let conn = manager.inner().connection();
    let mut unit_path = manager.load_unit(name).await.map_err(Stop::Call)?;
    let mut unit = unit_proxy(conn, &unit_path).await?;
    // The run's packages changed the unit's file (or a drop-in): systemd
    // keeps the definition it read until its unit files are reloaded, so
    // a restart now would start the old `ExecStart=`, perhaps a program
    // the upgrade removed. What `apt` does (the maintainer scripts' own
    // `systemctl daemon-reload`, captured and not performed in the
    // sandbox): reload them first, once the name is known to lead to a
    // permitted unit; then check again, as the reload may have changed
    // where it leads. A reload reads every unit file changed on the host
    // meanwhile: what the bundle's signed scope let it write, and what an
    // operator edited without reloading; the next boot would read them
    // anyway.
    if unit.need_daemon_reload().await.map_err(Stop::Call)? {
        check_unit(&unit, name, permits).await?;
        tracing::info!(
            unit = name,
            "its unit file changed on disk: systemd reloads its unit files first"
        );
        manager.reload().await.map_err(Stop::Call)?;
        progress.daemon_reloaded = true;
        unit_path = manager.load_unit(name).await.map_err(Stop::Call)?;
        unit = unit_proxy(conn, &unit_path).await?;
    }
    check_unit(&unit, name, permits).await?;
    let service = ServiceProxy::builder(conn)
        .path(unit_path)
        .map_err(Stop::Call)?
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .map_err(Stop::Call)?;
    progress.before = main_pid(&service).await;
    // Subscribed (the match rule is in place) before the job exists, so its
    // JobRemoved cannot be missed however fast it completes.
    let mut removed = manager.receive_job_removed().await.map_err(Stop::Call)?;
    let call = async {
        match a.action {
            ServiceAction::Reload => unit.reload(JOB_MODE).await,
            ServiceAction::Restart => unit.restart(JOB_MODE).await,
            ServiceAction::TryRestart => unit.try_restart(JOB_MODE).await,
        }
    };
    tokio::pin!(call);
    // The signals that arrive while the call is under way are drained
    // into `early`, not left queued: zbus delivers the reply and the
    // signals from one reader, which would stall behind a full signal
    // queue; and the job may be over before its reply is read.
    let mut early: Vec<(OwnedObjectPath, String)> = Vec::new();
    let job = loop {
        tokio::select! {
            reply = &mut call => break reply.map_err(Stop::Call)?,
            signal = removed.next() => match signal.map(|s| job_removed(&s)) {
                Some(Some(done)) => early.push(done),
                Some(None) => {}
                None => return Err(Stop::SignalStreamEnded),
            },
        }
    };
    tracing::debug!(unit = name, job = %job.as_str(), "job queued");
    let result = match early.into_iter().find(|(j, _)| *j == job) {
        Some((_, result)) => result,
        None => loop {
            match removed.next().await.map(|s| job_removed(&s)) {
                Some(Some((j, result))) if j == job => break result,
                Some(_) => continue,
                None => return Err(Stop::SignalStreamEnded),
            }
        },
    };
    // Unsubscribed before the next call, for the reason above: signals
    // queued behind it would stall the reply.
    drop(removed);
    progress.after = main_pid(&service).await;
    Ok(result)
}

/// The unit `name` led to may be acted upon: loaded, and, when the name is
/// an alias, the unit itself permitted.
async fn check_unit(
    unit: &UnitProxy<'static>,
    name: &str,
    permits: &dyn Fn(&UnitName) -> bool,
) -> Result<(), Stop> {
    // "not-found", "masked", "bad-setting", "error": systemd would refuse
    // the job; say what the unit is instead of relaying its refusal.
    let load_state = unit.load_state().await.map_err(Stop::Call)?;
    if load_state != "loaded" {
        return Err(Stop::NotLoaded(load_state));
    }
    // The name was checked against `allow` (and against the agent's own
    // units); an alias acts on another unit, which was not. Hosts have
    // legitimate ones (`sshd.service` for `ssh.service`, an init script's
    // name), and a bundle can make one: a symlink in a unit directory its
    // packages write. So the unit itself must be permitted too. The job
    // is then asked of this unit object, not of the name.
    let id = unit.id().await.map_err(Stop::Call)?;
    if id != name {
        if !UnitName::parse(&id).is_ok_and(|u| permits(&u)) {
            return Err(Stop::Alias(id));
        }
        tracing::info!(alias = name, unit = %id, "acting on an alias of a permitted unit");
    }
    Ok(())
}

async fn unit_proxy(
    conn: &zbus::Connection,
    path: &OwnedObjectPath,
) -> Result<UnitProxy<'static>, Stop> {
    UnitProxy::builder(conn)
        .path(path.clone())
        .map_err(Stop::Call)?
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .map_err(Stop::Call)
}

/// What one action's job got to, written as it goes, so that a timeout
/// still reports what was known.
#[derive(Default)]
struct Progress {
    before: Option<u32>,
    after: Option<u32>,
    daemon_reloaded: bool,
}

/// A `JobRemoved` signal's job and result. Not ours to judge: a signal
/// that cannot be read is skipped (logged), and the timeout bounds the
/// wait for ours.
fn job_removed(signal: &JobRemoved) -> Option<(OwnedObjectPath, String)> {
    match signal.args() {
        Ok(args) => Some((args.job, args.result)),
        Err(e) => {
            tracing::warn!(error = %e, "unreadable JobRemoved signal");
            None
        }
    }
}

/// `MainPID`, `None` when the unit has no main process (0) or the property
/// cannot be read: it is reported, never acted upon.
async fn main_pid(service: &ServiceProxy<'_>) -> Option<u32> {
    match service.main_pid().await {
        Ok(0) => None,
        Ok(pid) => Some(pid),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read MainPID");
            None
        }
    }
}

fn failed(a: &PlannedAction, result: &str, before: Option<u32>, ms: u64) -> ServiceOutcome {
    ServiceOutcome {
        unit: a.unit.clone(),
        action: a.action,
        source: a.source.clone(),
        result: result.to_string(),
        main_pid_before: before,
        main_pid_after: None,
        duration_ms: ms,
        daemon_reloaded: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rollguard_shared::services::ActionSource;

    fn act(unit: &str, action: ServiceAction, source: ActionSource) -> PlannedAction {
        PlannedAction {
            unit: UnitName::parse(unit).unwrap(),
            action,
            source,
        }
    }

    #[test]
    fn merge_keeps_first_appearance_order_and_the_strongest_action() {
        use ActionSource::*;
        use ServiceAction::*;
        let plan = [
            act("postfix.service", Reload, Declared),
            act("dovecot.service", TryRestart, Captured),
            act("postfix.service", Restart, Captured),
            act("dovecot.service", Reload, Declared),
            act("php8.2-fpm.service", TryRestart, Stale),
            act("postfix.service", TryRestart, Stale),
            act("dovecot.service", TryRestart, Stale),
        ];
        assert_eq!(
            merge(&plan),
            vec![
                act("postfix.service", Restart, Captured),
                act("dovecot.service", TryRestart, Captured),
                act("php8.2-fpm.service", TryRestart, Stale),
            ]
        );
        assert!(merge(&[]).is_empty());
    }

    /// No systemd needed: an unreachable bus is an outcome per unit, and a
    /// unit of another type never reaches the bus.
    #[test]
    fn an_unreachable_bus_is_an_error_outcome_for_every_unit() {
        let plan = [
            act("a.service", ServiceAction::Restart, ActionSource::Declared),
            act("b.service", ServiceAction::Reload, ActionSource::Captured),
        ];
        let bus = Bus::Address("unix:path=/nonexistent/rollguard-test-bus".into());
        let out = perform(&bus, &plan, DEFAULT_JOB_TIMEOUT, &|_| true);
        assert_eq!(out.len(), 2);
        for o in &out {
            assert!(o.result.starts_with("error: cannot reach systemd"), "{o:?}");
            assert!(!o.succeeded());
        }
        assert_eq!(out[1].action, ServiceAction::Reload);
    }

    /// The daemon calls the runner on Tokio's blocking pool: the broker's
    /// own runtime must work there (no "runtime within a runtime" panic).
    #[test]
    fn perform_works_on_a_tokio_blocking_thread() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let out = rt.block_on(async {
            tokio::task::spawn_blocking(|| {
                let plan = [act(
                    "a.service",
                    ServiceAction::Restart,
                    ActionSource::Declared,
                )];
                perform(
                    &Bus::Address("unix:path=/nonexistent/rollguard-test-bus".into()),
                    &plan,
                    DEFAULT_JOB_TIMEOUT,
                    &|_| true,
                )
            })
            .await
            .unwrap()
        });
        assert_eq!(out.len(), 1);
        assert!(out[0].result.starts_with("error:"), "{:?}", out[0]);
    }
}
