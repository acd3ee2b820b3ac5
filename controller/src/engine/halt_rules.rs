//! The halt rules: what a rollout's results count for, and when they
//! mean it must stop. Pure functions over the stored dispatches, so every
//! replica and every restart judges the same results the same way.

use rollguard_shared::report::RunStatus;

use crate::store::{DispatchRecord, Outcome, RolloutRecord};

/// Counters over a rollout's results, as the halt rules see them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Runs that did not succeed, timeouts included.
    pub failures: u32,
    /// Refusals, denials (or unknown denials) and timeouts: each halts.
    pub alarms: u32,
}

pub fn tally(dispatches: &[DispatchRecord]) -> Tally {
    let mut t = Tally::default();
    for d in dispatches {
        // A timeout counts for good, even once a late report has come: an
        // operator may have resumed past it (acknowledging the count).
        let timed_out = d.outcome == Outcome::TimedOut || d.reported_late;
        if timed_out {
            t.failures += 1;
            t.alarms += 1;
        }
        if let Outcome::Reported(r) = &d.outcome {
            // One failed host is one failure, however it failed...
            if r.status != RunStatus::Succeeded && !timed_out {
                t.failures += 1;
            }
            // ...but a late report's alarm (a denial) is an alarm of its
            // own: it must halt, not hide behind the timeout's count.
            if r.is_alert() {
                t.alarms += 1;
            }
        }
    }
    t
}

pub(super) fn describe_alarm(d: &DispatchRecord) -> Option<String> {
    match &d.outcome {
        Outcome::Dispatched => None,
        Outcome::TimedOut => Some(format!("{} sent no result in time", d.host)),
        Outcome::Reported(r) if r.is_alert() => Some(if r.status == RunStatus::Refused {
            format!(
                "{} refused the bundle: {}",
                d.host,
                r.reason.as_deref().unwrap_or("no reason given")
            )
        } else if r.services_captured.iter().any(|c| c.is_denied()) {
            let denied: Vec<String> = r
                .services_captured
                .iter()
                .filter(|c| c.is_denied())
                .map(|c| format!("{} {}", c.verb, c.unit))
                .collect();
            format!(
                "{} asked for service actions its policy does not allow: {}",
                d.host,
                denied.join(", ")
            )
        } else if !r.limits_hit.is_empty() && r.denial_count.unwrap_or(0) == 0 {
            format!(
                "{} hit resource limits: {}",
                d.host,
                r.limits_hit.join(", ")
            )
        } else {
            match &r.denials {
                None => format!("{} could not observe denials (unknown is not zero)", d.host),
                Some(list) => {
                    let first = list
                        .first()
                        .map(|x| format!(" ({} {})", x.access, x.path.as_deref().unwrap_or("")))
                        .unwrap_or_default();
                    let n = r.denial_count.unwrap_or(0).max(list.len() as u64);
                    format!("{} reported {n} denied access(es){first}", d.host)
                }
            }
        }),
        Outcome::Reported(r) if d.reported_late => Some(format!(
            "{} sent no result in time (then reported {:?})",
            d.host, r.status
        )),
        Outcome::Reported(_) => None,
    }
}

/// Why a rollout must halt now, if it must. Never a preview: nothing it
/// finds can harm a host, and its point is to hear from every host.
pub fn halt_reason(r: &RolloutRecord, dispatches: &[DispatchRecord]) -> Option<String> {
    if r.plan.preview {
        return None;
    }
    let t = tally(dispatches);
    if t.alarms > r.ack_alarms() {
        let what: Vec<String> = dispatches.iter().filter_map(describe_alarm).collect();
        let shown = what
            .iter()
            .rev()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ");
        return Some(format!("alarm: {shown}"));
    }
    let new_failures = t.failures.saturating_sub(r.ack_failures);
    if new_failures > r.plan.max_failures {
        return Some(format!(
            "{new_failures} failed host(s) exceed --max-failures {}",
            r.plan.max_failures
        ));
    }
    None
}
