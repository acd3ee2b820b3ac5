//! The runner's service step: declared units checked before the run, and
//! after it the captured requests read and decided, the actions performed
//! and the report filled in (docs/services.md).

use std::collections::BTreeSet;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use rollguard_shared::manifest::Services;
use rollguard_shared::report::{Denial, RunReport, RunStatus};
use rollguard_shared::services::{
    ActionSource, PlannedAction, ServiceAction, ServiceOutcome, UnitName, AGENT_UNIT,
};

use super::capture;
use super::{perform_all, Bus, ServiceRun, DEFAULT_JOB_TIMEOUT};
use crate::policy::ServicesPolicy;

/// The denial's `access` for a service request record the agent could
/// not read in full (see [`capture::Parsed`]).
pub const UNREADABLE_RECORD: &str = "service.unreadable_record";

/// Before anything runs: every declared unit must be allowed by the host,
/// or the bundle is refused (the host outranks the bundle); and none may
/// be the agent's own unit, whatever `allow` says (see
/// [`super::own_units`]).
pub fn check_declared(services: &Services, allow: &ServicesPolicy) -> Result<(), String> {
    let own = super::own_units();
    for (key, unit) in services.declared() {
        if own.contains(unit) {
            return Err(format!(
                "services.{key} unit {unit} is the agent's own unit ({AGENT_UNIT}, or the unit the agent runs in): a run never reloads or restarts it (that would stop the run that reports); restart it after the run"
            ));
        }
        if !allow.allows(unit) {
            return Err(format!(
                "services.{key} unit {unit} is not allowed by this host's policy ([services] allow = {:?})",
                allow.patterns()
            ));
        }
    }
    Ok(())
}

/// After the run: read what the sandbox captured, report it, and perform
/// the declared and allowed captured actions if the run succeeded with no
/// denial. `requests` is the run's service-request directory as stage 2
/// handed it over; `replaced` is what the run's packages replaced or
/// removed (the stale scan's input).
pub fn after_run(
    services: &Services,
    allow: &ServicesPolicy,
    requests: Option<&OwnedFd>,
    replaced: &BTreeSet<PathBuf>,
    perform: Perform,
    report: &mut RunReport,
) {
    let parsed = match requests {
        Some(dir) => capture::read_records(dir.as_fd()),
        // Stage 2 hands it over before the bundle starts: without it the
        // run did not start (its status says why), and nothing is
        // performed below.
        None if report.status != RunStatus::Succeeded => capture::Parsed::default(),
        None => {
            fail(
                report,
                format!(
                    "the sandbox did not hand over its service request directory {}; no service action was performed",
                    capture::REQUESTS_DIR
                ),
            );
            return;
        }
    };
    let records = parsed.records;
    let allowed = |u: &UnitName| allow.allows(u);
    let mut classified = capture::classify(&records, &allowed);
    let own_units = super::own_units();
    let own = classified.set_aside_own(&own_units);
    if !own.is_empty() {
        let units: Vec<&str> = own.iter().map(UnitName::as_str).collect();
        tracing::warn!(units = ?units, "a package script asked to reload or restart the agent's own unit: not performed (it would stop the run that reports)");
        note(
            report,
            format!(
                "not performed: the requests for the agent's own unit {} (a run never stops the agent; restart it after the run)",
                units.join(", ")
            ),
        );
    }
    let denied: Vec<String> = classified
        .denied()
        .map(|c| {
            let unit = if c.unit.is_empty() {
                "(no unit)"
            } else {
                &c.unit
            };
            format!("{} {unit} (via {})", c.verb, c.via)
        })
        .collect();
    for c in classified.denied() {
        tracing::warn!(unit = %c.unit, verb = %c.verb, via = %c.via, "service request outside [services] allow");
    }
    if let Some(why) = &parsed.unreadable {
        // Fail closed, and loudly: shims write only lines that parse, so
        // the bundle wrote this itself, and what it could not say in a
        // readable line may be a request it wanted to hide. An attempt
        // like any other: a denial, which halts the rollout.
        tracing::warn!(record = capture::REQUESTS_FILE, %why, "the run's service request record cannot be read in full");
        let unreadable = Denial {
            access: UNREADABLE_RECORD.to_string(),
            path: Some(capture::REQUESTS_FILE.to_string()),
            exe: None,
        };
        if let Some(count) = report.denial_count.as_mut() {
            *count += 1;
        }
        if let Some(d) = report.denials.as_mut() {
            d.push(unreadable);
        }
        fail(report, format!("{why}; no service action was performed"));
    }
    if !denied.is_empty() {
        let list: Vec<Denial> = classified
            .denied()
            .map(|c| Denial {
                access: format!("service.{}", c.verb),
                path: Some(c.unit.clone()),
                exe: Some(c.via.clone()),
            })
            .collect();
        if let Some(count) = report.denial_count.as_mut() {
            *count += list.len() as u64;
        }
        // An unknown list stays unknown (the controller and the CLI say
        // "unknown" on `None` alone): the request is in
        // `services_captured`, which halts the rollout all the same.
        if let Some(d) = report.denials.as_mut() {
            d.extend(list);
        }
        fail(
            report,
            format!(
                "service requests outside this host's [services] allow: {}",
                denied.join(", ")
            ),
        );
    }
    // Only after a clean success: a run that failed or was denied
    // something leaves the host as it is, for the operator to look at.
    // Unknown denials are not zero: they stop the actions too, unless the
    // host's policy accepts them (a host that can never observe denials).
    let denials_unknown = report.denials.is_none() || report.denial_count.is_none();
    let no_denial = report.denials.as_ref().is_none_or(|d| d.is_empty())
        && report.denial_count.unwrap_or(0) == 0;
    let clean = report.status == RunStatus::Succeeded
        && no_denial
        && (!denials_unknown || allow.perform_when_denials_unknown());
    let mut plan: Vec<PlannedAction> = declared_plan(services);
    plan.append(&mut classified.plan);
    if !clean {
        classified.mark_unperformed("skipped");
        set_captured(report, classified.captured);
        if !plan.is_empty() {
            let why = if report.status == RunStatus::Succeeded && no_denial {
                "no service action was performed: the run's denials are unknown \
                 (this host's policy does not set [services] perform_when_denials_unknown)"
            } else {
                "no service action was performed: the run did not succeed without denials"
            };
            note(report, why.into());
        }
        return;
    }
    if perform == Perform::PreviewOnly {
        // Nothing is performed: what would be is in `services`.
        classified.mark_unperformed(ServiceOutcome::PREVIEW);
        set_captured(report, classified.captured);
        report.services = would_perform(&plan);
        return;
    }
    set_captured(report, classified.captured);
    let bus = Bus::from_env();
    let permits = |u: &UnitName| allow.allows(u) && !own_units.contains(u);
    let run = ServiceRun {
        bus: &bus,
        timeout: DEFAULT_JOB_TIMEOUT,
        replaced,
        restart_stale: services
            .restart_stale
            .then_some(&allowed as &dyn Fn(&UnitName) -> bool),
        permits: &permits,
    };
    let (outcomes, stale) = perform_all(&run, &plan);
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.succeeded())
        .map(|o| format!("{} {}: {}", o.action.as_str(), o.unit, o.result))
        .collect();
    report.services = outcomes;
    report.stale_services = stale;
    if !failed.is_empty() {
        fail(
            report,
            format!("service action failed: {}", failed.join("; ")),
        );
    }
}

/// Whether the service step acts: a real run performs the actions, a
/// preview only reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Perform {
    Yes,
    PreviewOnly,
}

/// A preview's service step: the plan merged as [`perform_all`] merges it
/// (one action per unit, the strongest: [`super::broker::merge`]); result
/// [`ServiceOutcome::PREVIEW`], nothing performed.
fn would_perform(plan: &[PlannedAction]) -> Vec<ServiceOutcome> {
    super::broker::merge(plan)
        .into_iter()
        .map(|p| ServiceOutcome {
            unit: p.unit,
            action: p.action,
            source: p.source,
            result: ServiceOutcome::PREVIEW.to_string(),
            main_pid_before: None,
            main_pid_after: None,
            duration_ms: 0,
            daemon_reloaded: false,
        })
        .collect()
}

fn declared_plan(services: &Services) -> Vec<PlannedAction> {
    let entry = |action| {
        move |unit: &UnitName| PlannedAction {
            unit: unit.clone(),
            action,
            source: ActionSource::Declared,
        }
    };
    services
        .reload
        .iter()
        .map(entry(ServiceAction::Reload))
        .chain(services.restart.iter().map(entry(ServiceAction::Restart)))
        .collect()
}

/// The captured requests into the report: at most
/// [`capture::MAX_LISTED`], the denied ones first (each request was decided
/// all the same; the reason says how many are not listed).
fn set_captured(
    report: &mut RunReport,
    captured: Vec<rollguard_shared::services::CapturedRequest>,
) {
    if captured.len() <= capture::MAX_LISTED {
        report.services_captured = captured;
        return;
    }
    let total = captured.len();
    let (mut listed, other): (Vec<_>, Vec<_>) = captured.into_iter().partition(|c| c.is_denied());
    listed.truncate(capture::MAX_LISTED);
    let room = capture::MAX_LISTED - listed.len();
    listed.extend(other.into_iter().take(room));
    note(
        report,
        format!(
            "{} of the {total} captured service requests are not listed (the denied ones are listed first)",
            total - listed.len()
        ),
    );
    report.services_captured = listed;
}

fn note(report: &mut RunReport, what: String) {
    report.reason = Some(match report.reason.take() {
        Some(r) => format!("{r}; {what}"),
        None => what,
    });
}

/// The run fails (a succeeded run becomes failed; other statuses stay).
fn fail(report: &mut RunReport, why: String) {
    if report.status == RunStatus::Succeeded {
        report.status = RunStatus::Failed;
    }
    note(report, why);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rollguard_shared::services::ServiceAction;

    fn restart_postfix() -> Services {
        Services {
            reload: vec![],
            restart: vec![UnitName::parse("postfix.service").unwrap()],
            restart_stale: false,
        }
    }

    /// A successful run whose denials could not be observed: `denials` and
    /// `denial_count` both unknown, as where the kernel's audit is missing.
    fn unobserved_success() -> RunReport {
        RunReport::new("h", RunStatus::Succeeded)
    }

    fn step(policy: &str, perform: Perform, report: &mut RunReport) {
        // An empty request directory: the run captured nothing. The
        // services step must not need a request to refuse.
        step_with(policy, &restart_postfix(), &[], perform, report);
    }

    /// The service step after a run whose shims recorded `requests`
    /// (`(via, verb, unit)`).
    fn step_with(
        policy: &str,
        services: &Services,
        requests: &[(&str, &str, &str)],
        perform: Perform,
        report: &mut RunReport,
    ) {
        let allow = ServicesPolicy::from_toml(policy).unwrap();
        let dir = tempfile::tempdir().unwrap();
        if !requests.is_empty() {
            let lines: String = requests
                .iter()
                .map(|(via, verb, unit)| {
                    format!(
                        "{}\n",
                        serde_json::json!({"via": via, "verb": verb, "unit": unit})
                    )
                })
                .collect();
            std::fs::write(dir.path().join(capture::REQUESTS_NAME), lines).unwrap();
        }
        let fd = OwnedFd::from(std::fs::File::open(dir.path()).unwrap());
        after_run(
            services,
            &allow,
            Some(&fd),
            &BTreeSet::new(),
            perform,
            report,
        );
    }

    /// The step on a host allowing postfix only, after a run whose package
    /// script asked to restart `unit`.
    fn script_restarts(unit: &str, perform: Perform, report: &mut RunReport) {
        step_with(
            "[services]\nallow = [\"postfix.service\"]",
            &restart_postfix(),
            &[("deb-systemd-invoke", "restart", unit)],
            perform,
            report,
        );
    }

    fn observed_success() -> RunReport {
        let mut report = unobserved_success();
        report.denials = Some(vec![]);
        report.denial_count = Some(0);
        report
    }

    /// The preview says what the run would do: a declared restart and a
    /// package script's try-restart of the same unit merge into the
    /// restart, as the broker merges them; the captured request reads
    /// `preview`, since nothing was performed.
    #[test]
    fn a_preview_merges_as_the_run_would_and_performs_nothing() {
        let mut report = observed_success();
        step_with(
            "[services]\nallow = [\"postfix.service\"]",
            &restart_postfix(),
            &[("deb-systemd-invoke", "try-restart", "postfix.service")],
            Perform::PreviewOnly,
            &mut report,
        );
        assert_eq!(report.services.len(), 1, "{report:?}");
        assert_eq!(report.services[0].action, ServiceAction::Restart);
        assert_eq!(report.services[0].result, ServiceOutcome::PREVIEW);
        assert_eq!(report.services_captured.len(), 1, "{report:?}");
        assert_eq!(report.services_captured[0].disposition, "preview");
        assert_eq!(report.status, RunStatus::Succeeded);
    }

    /// A captured request outside `allow` fails the run and is an alert
    /// through `services_captured`; it joins `denials` only when those are
    /// known (an unknown list stays unknown, never a partial one).
    #[test]
    fn a_denied_request_fails_the_run_and_leaves_unknown_denials_unknown() {
        let mut report = unobserved_success();
        script_restarts("sshd.service", Perform::Yes, &mut report);
        assert_eq!(report.denials, None, "{report:?}");
        assert_eq!(report.denial_count, None);
        assert_eq!(report.status, RunStatus::Failed);
        assert!(report.services.is_empty(), "{report:?}");
        assert!(report.is_alert());
        assert_eq!(report.services_captured[0].disposition, "denied");

        let mut report = observed_success();
        script_restarts("sshd.service", Perform::Yes, &mut report);
        let denials = report.denials.as_deref().unwrap_or_default();
        assert_eq!(denials.len(), 1, "{report:?}");
        assert_eq!(denials[0].access, "service.restart");
        assert_eq!(denials[0].path.as_deref(), Some("sshd.service"));
        assert_eq!(report.denial_count, Some(1));
    }

    /// A line the agent cannot read hides none of the others, and is an
    /// attempt by itself: the denied request before it and the unreadable
    /// record are both denials (the run is an alert, never a retryable
    /// failure), and nothing is performed, not even the declared restart.
    #[test]
    fn an_unreadable_line_is_a_denial_and_hides_no_denied_request() {
        let mut report = observed_success();
        step_with(
            "[services]\nallow = [\"postfix.service\"]",
            &restart_postfix(),
            &[
                ("systemctl", "stop", "sshd.service"),
                ("service", "try_restart", "postfix.service"),
            ],
            Perform::Yes,
            &mut report,
        );
        assert_eq!(report.status, RunStatus::Failed);
        let access: Vec<&str> = report
            .denials
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|d| d.access.as_str())
            .collect();
        assert_eq!(access, [UNREADABLE_RECORD, "service.stop"], "{report:?}");
        assert_eq!(report.denial_count, Some(2));
        assert!(report.is_alert());
        assert!(report.services.is_empty(), "{report:?}");
        assert!(
            report.reason.as_deref().unwrap().contains("line 2"),
            "{report:?}"
        );
        assert_eq!(
            crate::state::VersionOutcome::of_report(&report),
            crate::state::VersionOutcome::Denied
        );
    }

    /// Whatever `allow` says, the agent's own unit is never declared, and a
    /// package script's request for it (the agent's own package, upgraded)
    /// is not performed: it would stop the run that reports.
    #[test]
    fn the_agents_own_unit_is_never_acted_upon() {
        let policy = "[services]\nallow = [\"*.service\"]";
        let own = Services {
            reload: vec![],
            restart: vec![UnitName::parse(rollguard_shared::services::AGENT_UNIT).unwrap()],
            restart_stale: false,
        };
        let why = check_declared(&own, &ServicesPolicy::from_toml(policy).unwrap()).unwrap_err();
        assert!(why.contains("the agent's own unit"), "{why}");

        let mut report = observed_success();
        step_with(
            policy,
            &Services {
                reload: vec![],
                restart: vec![],
                restart_stale: false,
            },
            &[
                ("deb-systemd-invoke", "restart", "rollguard-agent.service"),
                ("deb-systemd-invoke", "restart", "postfix.service"),
            ],
            Perform::PreviewOnly,
            &mut report,
        );
        let units: Vec<&str> = report.services.iter().map(|o| o.unit.as_str()).collect();
        assert_eq!(units, ["postfix.service"], "{report:?}");
        let dispositions: Vec<&str> = report
            .services_captured
            .iter()
            .map(|c| c.disposition.as_str())
            .collect();
        assert_eq!(dispositions, ["skipped", "preview"], "{report:?}");
        assert_eq!(report.status, RunStatus::Succeeded);
        let reason = report.reason.unwrap_or_default();
        assert!(reason.contains("rollguard-agent.service"), "{reason}");

        // Outside `allow`, it is a denial like any other unit.
        let mut report = observed_success();
        script_restarts("rollguard-agent.service", Perform::PreviewOnly, &mut report);
        assert_eq!(report.services_captured[0].disposition, "denied");
        assert_eq!(report.status, RunStatus::Failed);
    }

    #[test]
    fn unknown_denials_perform_nothing_by_default() {
        let mut report = unobserved_success();
        step(
            "[services]\nallow = [\"postfix.service\"]",
            Perform::Yes,
            &mut report,
        );
        assert!(report.services.is_empty(), "{:?}", report.services);
        let reason = report.reason.unwrap_or_default();
        assert!(reason.contains("denials are unknown"), "{reason}");
        assert!(reason.contains("perform_when_denials_unknown"), "{reason}");
        // The run itself did not fail: the controller halts on the
        // unknown denials, and the report says why nothing was performed.
        assert_eq!(report.status, RunStatus::Succeeded);
    }

    #[test]
    fn a_host_that_accepts_unknown_denials_goes_on() {
        // A preview goes as far as a real run would without touching a bus.
        let mut report = unobserved_success();
        step(
            "[services]\nallow = [\"postfix.service\"]\nperform_when_denials_unknown = true",
            Perform::PreviewOnly,
            &mut report,
        );
        assert_eq!(report.services.len(), 1, "{report:?}");
        assert_eq!(report.services[0].action, ServiceAction::Restart);
        assert_eq!(report.services[0].result, ServiceOutcome::PREVIEW);
    }

    #[test]
    fn observed_zero_denials_go_on_without_the_setting() {
        let mut report = unobserved_success();
        report.denials = Some(vec![]);
        report.denial_count = Some(0);
        step(
            "[services]\nallow = [\"postfix.service\"]",
            Perform::PreviewOnly,
            &mut report,
        );
        assert_eq!(report.services.len(), 1, "{report:?}");
    }
}
