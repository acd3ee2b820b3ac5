//! `rollout retry ID --failed`: which hosts of a finished rollout get the
//! same signed bundle again, and the new rollout that sends it. Each agent
//! decides again on its own record (`rollguard_agent::state::may_start`);
//! docs/fleet.md, "Retrying failed hosts", says why this opens no replay.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use rollguard_shared::protocol::{Plan, RetryResponse, RetrySkipped, RolloutId, RolloutState};
use rollguard_shared::report::RunStatus;

use super::{new_rollout_id, ClusterEvent, Engine, EngineError, Result};
use crate::notify::Event;
use crate::store::{now_ms, DispatchRecord, Outcome, RolloutRecord};

/// Which hosts of a finished rollout `rollout retry --failed` sends the
/// same bundle to again, in the original's dispatch order, and which it
/// leaves out and why. Retried: a run that failed, timed out (on the host
/// or with no result in time), was killed or was interrupted, with no
/// denial (a run with unknown denials is left out, unknown is not zero,
/// except one interrupted by the agent's crash), no resource limit hit and no refused service
/// action. Never retried: a success (success is final), a refusal or any
/// denial (those need a new bundle), a host never dispatched or without a
/// result yet. Each agent decides again on its own record
/// (`rollguard_agent::state::may_start`).
pub fn retry_selection(
    r: &RolloutRecord,
    dispatches: &[DispatchRecord],
) -> (Vec<String>, Vec<RetrySkipped>) {
    let by_host: HashMap<&str, &DispatchRecord> =
        dispatches.iter().map(|d| (d.host.as_str(), d)).collect();
    let mut retried = Vec::new();
    let mut skipped = Vec::new();
    for host in r.plan.waves.iter().flatten() {
        let skip = |state: &str, why: String| RetrySkipped {
            host: host.clone(),
            state: state.to_string(),
            why,
        };
        let d = match by_host.get(host.as_str()) {
            None => {
                skipped.push(skip(
                    "pending",
                    format!(
                        "never dispatched (the rollout stopped before its wave): `rollout resume {}` sends it",
                        r.id
                    ),
                ));
                continue;
            }
            Some(d) => d,
        };
        let rep = match &d.outcome {
            Outcome::Dispatched => {
                skipped.push(skip("dispatched", "no result yet".into()));
                continue;
            }
            Outcome::TimedOut => {
                retried.push(host.clone());
                continue;
            }
            Outcome::Reported(rep) => rep,
        };
        let state = serde_json::to_value(rep.status)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_else(|| "reported".into());
        let denied = match &rep.denials {
            Some(list) => !list.is_empty() || rep.denial_count.unwrap_or(0) > 0,
            // A crash of the agent cuts the collection of denials short
            // (the agent's own record then says `interrupted`); any other
            // run with unknown denials is not retried, as its agent's
            // record says (`VersionOutcome::of_report`).
            None => rep.status != RunStatus::Interrupted,
        };
        let why = match rep.status {
            RunStatus::Succeeded => Some("succeeded: success is final".to_string()),
            RunStatus::Refused => Some(format!(
                "refused ({}): a refusal needs a new bundle or a changed host, not a retry",
                rep.reason.as_deref().unwrap_or("no reason given")
            )),
            _ if denied => Some(match &rep.denials {
                None => "its denials could not be observed (unknown is not zero): not retried"
                    .to_string(),
                Some(_) => {
                    "it had denied accesses: a denial needs a new bundle, not a retry".to_string()
                }
            }),
            _ if !rep.limits_hit.is_empty() => Some(format!(
                "it hit resource limits ({}): not retried",
                rep.limits_hit.join(", ")
            )),
            _ if rep.services_captured.iter().any(|c| c.is_denied()) => {
                Some("it asked for service actions its policy does not allow: not retried".into())
            }
            RunStatus::Failed
            | RunStatus::TimedOut
            | RunStatus::Killed
            | RunStatus::Interrupted => None,
        };
        match why {
            Some(why) => skipped.push(skip(&state, why)),
            None => retried.push(host.clone()),
        }
    }
    (retried, skipped)
}

/// A retry's waves: one host first (the original's canary, if it is
/// retried), then the rest; one wave when there is one host.
pub fn retry_waves(hosts: &[String]) -> Vec<Vec<String>> {
    match hosts.split_first() {
        None => vec![],
        Some((first, [])) => vec![vec![first.clone()]],
        Some((first, rest)) => vec![vec![first.clone()], rest.to_vec()],
    }
}

impl Engine {
    /// `rollout retry ID --failed`: a new rollout of the same bundle (the
    /// same signed bytes) to the hosts of finished rollout `id` whose run
    /// did not succeed and had no denial ([`retry_selection`]), one host
    /// first, with the original's bake, failure limit and halt
    /// conditions. Its orders are `Order::Run` with `retry`; each agent
    /// runs the version again only if its own record allows it.
    pub async fn retry(
        self: &Arc<Self>,
        id: &RolloutId,
        failed: bool,
        actor: &str,
    ) -> Result<RetryResponse> {
        if !failed {
            return Err(EngineError::BadRequest(
                "say which hosts to retry: --failed (those whose run failed, timed out, was killed or interrupted, with no denial)".into(),
            ));
        }
        let original = self
            .store
            .rollout(id)
            .await?
            .ok_or_else(|| EngineError::NotFound(format!("no rollout {id}")))?;
        if original.plan.preview {
            return Err(EngineError::BadRequest(format!(
                "{id} is a preview: it changed nothing and used up no version; start the preview again instead"
            )));
        }
        if original.state == RolloutState::Running {
            return Err(EngineError::Conflict(format!(
                "rollout {id} is running: retry it once it has completed or halted (`rollout halt {id}` first)"
            )));
        }
        if let Some(k) = self.store.kill_state().await?.covering(id) {
            return Err(EngineError::Conflict(format!(
                "a kill order is in force for rollout {id} ({}, by {}); lift it before retrying",
                k.reason, k.by
            )));
        }
        if let Some(other) = self
            .store
            .rollouts_in_state(RolloutState::Running)
            .await?
            .into_iter()
            .find(|r| r.plan.retry_of.as_ref() == Some(id))
        {
            return Err(EngineError::Conflict(format!(
                "rollout {} is already retrying {id}; wait for it to finish",
                other.id
            )));
        }
        let dispatches = self.store.dispatches(id).await?;
        let (candidates, mut skipped) = retry_selection(&original, &dispatches);
        // Hosts gone from the inventory since are not retried.
        let registered: HashSet<String> = self
            .store
            .list_agents()
            .await?
            .into_iter()
            .map(|a| a.name)
            .collect();
        // Nor are hosts offline now: each would only time out and halt
        // the retry (as `rollout start` leaves them out).
        let online = self.online_agents().await;
        let mut retried = Vec::new();
        for host in candidates {
            if !registered.contains(&host) {
                skipped.push(RetrySkipped {
                    host,
                    state: "unregistered".into(),
                    why: "no longer a registered agent".into(),
                });
            } else if !online.contains(&host) {
                skipped.push(RetrySkipped {
                    host,
                    state: "offline".into(),
                    why: "not connected now; retry again once it is".into(),
                });
            } else {
                retried.push(host);
            }
        }
        if retried.is_empty() {
            let shown = skipped
                .iter()
                .take(5)
                .map(|s| format!("{} {}: {}", s.host, s.state, s.why))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(EngineError::Conflict(format!(
                "nothing to retry in rollout {id}: no host failed without a denial ({shown})"
            )));
        }
        let gate = self.alert_gate(&original.plan.halt_on).await;
        if let Err(why) = gate {
            tracing::warn!(rollout = %id, %why, by = %actor, "retry not started");
            return Err(EngineError::Conflict(format!(
                "not retrying rollout {id}: {why}"
            )));
        }
        let plan = Plan {
            waves: retry_waves(&retried),
            left_out: vec![],
            offline: vec![],
            include_offline: false,
            preview: false,
            after_preview: None,
            retry_of: Some(id.clone()),
            ..original.plan.clone()
        };
        let now = now_ms();
        let new_id = new_rollout_id(now, &original.bundle_sha256)?;
        let record =
            RolloutRecord::starting(new_id.clone(), original.bundle_sha256.clone(), plan, now);
        self.store
            .append_operator_log(
                actor,
                "rollout.retry",
                &serde_json::json!({ "rollout": new_id, "retry_of": id, "bundle": original.bundle_sha256,
                                     "name": original.plan.bundle.name, "version": original.plan.bundle.version,
                                     "waves": record.plan.waves, "skipped": skipped }),
            )
            .await?;
        self.store.create_rollout(&record).await?;
        self.halt_if_killed_meanwhile(&new_id).await?;
        tracing::info!(rollout = %new_id, retry_of = %id, hosts = retried.len(), by = %actor, "retry rollout started");
        self.notifier.send(Event::RolloutStarted {
            rollout: new_id.to_string(),
            bundle: original.plan.bundle.name.clone(),
            version: original.plan.bundle.version,
            hosts: retried.len(),
            by: actor.to_string(),
        });
        self.spawn(new_id.clone());
        self.cluster
            .publish(ClusterEvent::Rollout { id: new_id.clone() })
            .await;
        Ok(RetryResponse {
            retry_of: id.clone(),
            retried,
            skipped,
            rollout: self.status(&new_id).await?,
        })
    }
}
