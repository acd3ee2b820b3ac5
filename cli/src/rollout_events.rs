//! The events of `rollguard rollout watch --json`: one JSON object per
//! line on stdout, each a change since the previous poll, for scripts and
//! chat bridges that follow a rollout without a terminal.
//!
//! - `{"event": "rollout", ...}`: the rollout's state, phase or current
//!   wave changed (and once at the start), with the halt reason if any;
//! - `{"event": "host", ...}`: one host's state changed (and once per host
//!   at the start), with its run report once it has one;
//! - `{"event": "end", ...}`: the rollout stopped moving (halted or
//!   completed), with the exit status `watch` ends with; the last line.
//!
//! Every event carries the rollout `id` and `at`, when the change was seen.
//! Events are derived by comparing successive snapshots (the controller's
//! `GET /v1/rollouts/ID`), so a state held for less than one poll can be
//! missed; the final report of every host and the end are never missed.

use rollguard_shared::exit::Exit;
use rollguard_shared::protocol::{RolloutState, RolloutStatus};
use serde_json::{json, Value};

/// What changed from `prev` (none: the first poll) to `now`, in order:
/// the rollout first, then hosts in the controller's order, then the end
/// if the rollout stopped moving.
pub fn events(prev: Option<&RolloutStatus>, now: &RolloutStatus, at: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let rollout_changed = prev.is_none_or(|p| {
        (p.state, p.phase, p.current_wave, &p.halt_reason)
            != (now.state, now.phase, now.current_wave, &now.halt_reason)
    });
    if rollout_changed {
        out.push(json!({
            "event": "rollout",
            "id": now.id,
            "at": at,
            "bundle": {"name": now.plan.bundle.name, "version": now.plan.bundle.version},
            "state": now.state,
            "phase": now.phase,
            "current_wave": now.current_wave,
            "wave_count": now.wave_count,
            "halt_reason": now.halt_reason,
        }));
    }
    for host in &now.hosts {
        let before = prev.and_then(|p| p.hosts.iter().find(|h| h.host == host.host));
        let changed = before.is_none_or(|b| b.state != host.state || b.report != host.report);
        if changed {
            out.push(json!({
                "event": "host",
                "id": now.id,
                "at": at,
                "host": host.host,
                "wave": host.wave,
                "state": host.state,
                "report": host.report,
            }));
        }
    }
    if now.state != RolloutState::Running {
        let exit = exit_of(now);
        out.push(json!({
            "event": "end",
            "id": now.id,
            "at": at,
            "state": now.state,
            "halt_reason": now.halt_reason,
            "exit_code": exit.code(),
        }));
    }
    out
}

/// The status `watch` ends with: a halted rollout is "failed".
pub fn exit_of(s: &RolloutStatus) -> Exit {
    if s.state == RolloutState::Halted {
        Exit::Failed
    } else {
        Exit::Success
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: &str, hosts: &[(&str, &str)], halt: Option<&str>) -> RolloutStatus {
        serde_json::from_value(json!({
            "id": "r-0123456789abcdef",
            "state": state,
            "phase": "awaiting",
            "current_wave": 0,
            "wave_count": 1,
            "halt_reason": halt,
            "plan": {
                "bundle": {"name": "mail-fix", "version": 3, "sha256": "00".repeat(32),
                           "size": 1},
                "targets": {}, "scope": {}, "signers": [], "timeout_secs": 60,
                "bake_secs": 0, "max_failures": 0, "halt_on": {},
                "waves": [hosts.iter().map(|h| h.0).collect::<Vec<_>>()],
                "out_of_scope": 0
            },
            "hosts": hosts.iter().map(|(h, s)| json!({"host": h, "wave": 0, "state": s}))
                .collect::<Vec<_>>(),
            "created_at": "t0", "updated_at": "t0"
        }))
        .unwrap()
    }

    fn kinds(events: &[Value]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e["event"].as_str().unwrap() {
                "host" => format!(
                    "host {} {}",
                    e["host"].as_str().unwrap(),
                    e["state"].as_str().unwrap()
                ),
                other => other.to_string(),
            })
            .collect()
    }

    #[test]
    fn the_first_poll_shows_everything_then_only_changes() {
        let a = status(
            "running",
            &[("mail-01", "dispatched"), ("mail-02", "pending")],
            None,
        );
        assert_eq!(
            kinds(&events(None, &a, "t1")),
            ["rollout", "host mail-01 dispatched", "host mail-02 pending"]
        );
        assert!(events(Some(&a), &a, "t2").is_empty(), "nothing changed");
        let b = status(
            "running",
            &[("mail-01", "succeeded"), ("mail-02", "pending")],
            None,
        );
        assert_eq!(
            kinds(&events(Some(&a), &b, "t3")),
            ["host mail-01 succeeded"]
        );
    }

    #[test]
    fn a_halt_ends_the_stream_with_the_reason_and_status_1() {
        let a = status("running", &[("mail-01", "dispatched")], None);
        let b = status(
            "halted",
            &[("mail-01", "failed")],
            Some("mail-01: denied /srv"),
        );
        let ev = events(Some(&a), &b, "t4");
        assert_eq!(kinds(&ev), ["rollout", "host mail-01 failed", "end"]);
        let end = ev.last().unwrap();
        assert_eq!(end["halt_reason"], "mail-01: denied /srv");
        assert_eq!(end["exit_code"], 1);
        assert_eq!(end["id"], "r-0123456789abcdef");
        assert_eq!(end["at"], "t4");
    }
}
