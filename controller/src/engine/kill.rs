//! The kill switch on the controller: a kill stored, then pushed to every
//! agent (this replica's directly, the others' through them) whatever
//! fails after, the covered rollouts halted, and the agents'
//! acknowledgements counted; its lift; and the check that a rollout made
//! running meanwhile was not missed.

use std::collections::HashSet;
use std::time::Duration;

use rollguard_shared::protocol::{
    KillOrder, KillResponse, KillScope, KillState, Order, RolloutId, RolloutState,
};

use super::{ClusterEvent, Engine, EngineError, Result};
use crate::hub::encode;
use crate::notify::Event;

impl Engine {
    /// Called after a rollout was made running (started, resumed, retried)
    /// and before its task is spawned. A kill that committed after this
    /// call's own kill check came first read its list of running rollouts
    /// before this one was running, and so did not halt it; read again
    /// now (after the write), that kill is found, and the rollout halted
    /// before it dispatches anything.
    ///
    /// A database error here is only logged: the rollout is running, and
    /// its task must be spawned all the same; the task checks the kill
    /// state again before each wave ([`Engine::step`]).
    pub(crate) async fn halt_if_killed_meanwhile(&self, id: &RolloutId) -> Result<()> {
        match self.halt_if_killed(id).await {
            Ok(None) => Ok(()),
            Ok(Some(k)) => Err(EngineError::Conflict(format!(
                "rollout {id} is halted: a kill order came in meanwhile ({}, by {})",
                k.reason, k.by
            ))),
            Err(e) => {
                tracing::error!(rollout = %id, error = %e, "cannot check the kill state again; the rollout's task checks it before dispatching");
                Ok(())
            }
        }
    }

    /// Halt `id` if a kill order covers it; the order, if one does.
    pub(super) async fn halt_if_killed(&self, id: &RolloutId) -> Result<Option<KillOrder>> {
        let Some(k) = self.store.kill_state().await?.covering(id).cloned() else {
            return Ok(None);
        };
        self.halt_internal(id, &kill_halt_reason(&k)).await?;
        Ok(Some(k))
    }

    pub async fn kill(&self, scope: KillScope, reason: &str, actor: &str) -> Result<KillResponse> {
        if reason.trim().is_empty() {
            return Err(EngineError::BadRequest("a kill needs a --reason".into()));
        }
        if let KillScope::Rollout(id) = &scope {
            if self.store.rollout(id).await?.is_none() {
                return Err(EngineError::NotFound(format!("no rollout {id}")));
            }
        }
        let order = KillOrder {
            reason: reason.to_string(),
            by: actor.to_string(),
            at: jiff::Timestamp::now().to_string(),
        };
        // Durable first: a controller restart keeps the kill in force.
        self.store
            .append_operator_log(
                actor,
                "kill",
                &serde_json::json!({ "scope": scope, "reason": reason }),
            )
            .await?;
        let state = self.store.add_kill(&scope, &order).await?;
        self.notifier.send(Event::KillIssued {
            scope: serde_json::to_value(&scope).unwrap_or_default(),
            reason: reason.to_string(),
            by: actor.to_string(),
        });
        // Halt first (conditional updates only), so no further wave is
        // dispatched and the halt reason is the kill, not the `killed`
        // reports that follow; then push to the agents, every replica's at
        // once; then the halts' bookkeeping, while the agents act.
        // The kill is in force once stored: nothing after this may keep it
        // from the agents. A halt the database fails is reported in the
        // answer, not returned as an error before the push (the agents
        // refuse and kill the rollout's runs anyway, and their `killed`
        // reports halt it).
        let halt_reason = kill_halt_reason(&order);
        let mut halted = Vec::new();
        let mut halt_errors = Vec::new();
        match self.store.rollouts_in_state(RolloutState::Running).await {
            Err(e) => halt_errors.push(format!("listing the running rollouts: {e}")),
            Ok(running) => {
                for r in running {
                    let covered = match &scope {
                        KillScope::All => true,
                        KillScope::Rollout(id) => *id == r.id,
                    };
                    if !covered {
                        continue;
                    }
                    match self.store.halt(&r.id, &halt_reason).await {
                        Ok(true) => halted.push(r.id.clone()),
                        Ok(false) => {}
                        Err(e) => halt_errors.push(format!("halting rollout {}: {e}", r.id)),
                    }
                }
            }
        }
        let push = self.push_kill_state(&state).await;
        tracing::warn!(?scope, %reason, by = %actor, agents = push.sent.len(), "kill order sent");
        for id in &halted {
            if let Err(e) = self.after_halt(id, &halt_reason).await {
                halt_errors.push(format!("recording the halt of rollout {id}: {e}"));
            }
        }
        for e in &halt_errors {
            tracing::error!(error = %e, "the kill is in force and sent, but a halt failed");
        }
        let acks = push.acknowledged(self).await;
        self.metrics.kill_orders.inc();
        tracing::warn!(?scope, %reason, by = %actor, agents = acks.sent, pending = acks.pending_count, replicas_silent = acks.replicas_silent, "kill order acknowledged");
        let mut response = acks.response(state, halted);
        response.halt_errors = halt_errors;
        Ok(response)
    }

    pub async fn lift(&self, scope: Option<KillScope>, actor: &str) -> Result<KillResponse> {
        self.store
            .append_operator_log(actor, "kill.lift", &serde_json::json!({ "scope": scope }))
            .await?;
        let state = self.store.lift_kill(scope.as_ref()).await?;
        self.notifier.send(Event::KillLifted {
            scope: serde_json::to_value(&scope).unwrap_or_default(),
            by: actor.to_string(),
        });
        let acks = self.push_kill_state(&state).await.acknowledged(self).await;
        tracing::warn!(?scope, by = %actor, "kill order lifted");
        Ok(acks.response(state, vec![]))
    }

    /// Push a new kill state to every agent: this replica's directly, the
    /// other replicas' through them. [`KillPush::acknowledged`] then waits
    /// (bounded) for the acknowledgements.
    async fn push_kill_state(&self, state: &KillState) -> KillPush {
        // Listening for the other replicas' answers before they can come.
        let answers = self.peer_acks.subscribe();
        let peers = self.cluster.live_peers().await;
        self.cluster
            .publish(ClusterEvent::Kill {
                generation: state.generation,
            })
            .await;
        let sent = self.hub.broadcast(encode(&Order::KillState(state.clone())));
        KillPush {
            generation: state.generation,
            sent,
            peers,
            answers,
        }
    }
}

/// Another replica's answer to a kill this one took.
#[derive(Debug, Clone)]
pub struct PeerAcks {
    pub(super) from: u64,
    pub(super) generation: u64,
    pub(super) sent: u32,
    pub(super) pending: Vec<String>,
    pub(super) pending_count: u32,
}

/// A kill state on its way to the agents (see [`Engine::push_kill_state`]).
struct KillPush {
    generation: u64,
    /// This replica's agents it was sent to.
    sent: Vec<String>,
    /// The other live replicas, whose answers are awaited.
    peers: Vec<u64>,
    answers: tokio::sync::broadcast::Receiver<PeerAcks>,
}

/// How the whole fleet took a kill state, as far as it answered in time.
struct KillAcks {
    sent: usize,
    pending: Vec<String>,
    pending_count: usize,
    replicas_silent: usize,
}

impl KillPush {
    /// Wait for this replica's agents and, a little longer, for the other
    /// replicas' answers (each waits for its own agents as long).
    async fn acknowledged(mut self, engine: &Engine) -> KillAcks {
        let deadline =
            tokio::time::Instant::now() + engine.kill_ack_timeout + Duration::from_millis(500);
        let pending = engine
            .hub
            .wait_acks(&self.sent, self.generation, engine.kill_ack_timeout)
            .await;
        let mut acks = KillAcks {
            sent: self.sent.len(),
            pending_count: pending.len(),
            pending,
            replicas_silent: 0,
        };
        let mut waiting: HashSet<u64> = self.peers.iter().copied().collect();
        while !waiting.is_empty() {
            match tokio::time::timeout_at(deadline, self.answers.recv()).await {
                Ok(Ok(a)) if a.generation == self.generation && waiting.remove(&a.from) => {
                    acks.sent += a.sent as usize;
                    acks.pending_count += a.pending_count as usize;
                    acks.pending.extend(a.pending);
                }
                Ok(Ok(_)) => {}
                // Lagged: answers were dropped; keep waiting for the rest.
                Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(_)) | Err(_) => break,
            }
        }
        acks.replicas_silent = waiting.len();
        acks
    }
}

impl KillAcks {
    fn response(self, state: KillState, halted_rollouts: Vec<RolloutId>) -> KillResponse {
        KillResponse {
            state,
            halted_rollouts,
            agents_sent: self.sent as u32,
            agents_acked: self.sent.saturating_sub(self.pending_count) as u32,
            agents_pending: self.pending,
            replicas_silent: self.replicas_silent as u32,
            halt_errors: Vec::new(),
        }
    }
}

/// Why a kill halted a rollout, as its halt reason says.
fn kill_halt_reason(k: &KillOrder) -> String {
    format!("kill switch by {}: {}", k.by, k.reason)
}
