//! The rollout engine: plans waves, dispatches them durably, awaits
//! results, bakes, and halts on its own.
//!
//! Each running rollout has one task ([`Engine::drive`]) that re-reads the
//! rollout from the store on every step and moves it forward by at most one
//! transition, so a controller restart simply starts the tasks again and
//! they continue from the database: hosts with a stored result are never
//! dispatched again, and orders recorded but unanswered are re-sent (agents
//! dedupe by rollout id, so a re-sent order never causes a second run).
//!
//! Halting is the store's conditional `running → halted` update; a task
//! that finds its rollout not running stops, and dispatch is recorded only
//! inside a transaction that checks the rollout is still running.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rollguard_shared::alert_matcher::Matcher;
use rollguard_shared::manifest::Manifest;
use rollguard_shared::protocol::{
    AfterPreview, AgentReport, AlertResponse, BundleSummary, HostRun, Matchers, Order, Plan,
    RolloutId, RolloutRequest, RolloutState, RolloutStatus, Sha256Hex, WavePhase, WaveSize,
    MAX_BAKE_SECS,
};
use rollguard_shared::report::RunStatus;
use rollguard_shared::targets::{HostIdentity, HostPattern};
use tokio::sync::Notify;

use crate::alertmanager_api::AlertmanagerApi;
use crate::alerts::AlertmanagerPayload;
use crate::cluster::{Cluster, Event as ClusterEvent, PENDING_NAMES};
use crate::hub::{encode, Hub};
use crate::metrics::Metrics;
use crate::notify::Event;
use crate::store::{
    now_ms, rfc3339, AgentRecord, BundleMeta, DispatchRecord, Millis, NewReport, Outcome,
    ReportOutcome, RolloutRecord, Store, StoreError,
};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Forbidden(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

type Result<T> = std::result::Result<T, EngineError>;

/// The in-scope hosts `--limit` and `--exclude` keep, and those they
/// leave out (sorted). Each pattern must match an in-scope host: a typo in
/// `--exclude` would otherwise send the bundle to the very host it was
/// meant to spare, and one in `--limit` would silently plan nothing. No
/// host left is refused too (an empty rollout is a mistake, not a success).
pub fn narrow(
    in_scope: Vec<String>,
    limit: &[HostPattern],
    exclude: &[HostPattern],
) -> std::result::Result<(Vec<String>, Vec<String>), String> {
    for (flag, patterns) in [("--limit", limit), ("--exclude", exclude)] {
        if let Some(p) = patterns
            .iter()
            .find(|p| !in_scope.iter().any(|h| p.matches(h)))
        {
            return Err(format!(
                "{flag} {:?} matches no host in the bundle's targets",
                p.as_str()
            ));
        }
    }
    let (kept, mut left_out): (Vec<String>, Vec<String>) = in_scope.into_iter().partition(|h| {
        (limit.is_empty() || limit.iter().any(|p| p.matches(h)))
            && !exclude.iter().any(|p| p.matches(h))
    });
    if kept.is_empty() {
        return Err("--limit and --exclude leave no host to roll out to".to_string());
    }
    left_out.sort();
    Ok((kept, left_out))
}

/// The default halt selector: any firing alert with `severity=critical`.
pub fn default_halt_on() -> Matchers {
    Matchers::new(vec![Matcher::equal("severity", "critical")])
}

/// Split the in-scope hosts into cumulative waves. Canaries (which must be
/// in scope) come first in the order given, then the rest by name; empty
/// waves (a percentage that rounds to no new host) are dropped.
pub fn compute_waves(
    mut in_scope: Vec<String>,
    canaries: &[String],
    sizes: &[WaveSize],
) -> std::result::Result<Vec<Vec<String>>, String> {
    if sizes.is_empty() {
        return Err("no waves given".into());
    }
    in_scope.sort();
    in_scope.dedup();
    let mut order = Vec::with_capacity(in_scope.len());
    let mut seen = HashSet::new();
    for c in canaries {
        if !in_scope.contains(c) {
            return Err(format!(
                "canary {c:?} is not a registered agent in the bundle's targets"
            ));
        }
        if seen.insert(c.clone()) {
            order.push(c.clone());
        }
    }
    order.extend(in_scope.into_iter().filter(|h| !seen.contains(h)));
    let total = order.len();
    let mut waves = Vec::new();
    let mut done = 0;
    for size in sizes {
        let upto = size.cumulative(total).max(done);
        if upto > done {
            waves.push(order[done..upto].to_vec());
            done = upto;
        }
    }
    Ok(waves)
}

impl RolloutRecord {
    /// A rollout as it is when it starts: running, its first wave about
    /// to be dispatched.
    fn starting(id: RolloutId, bundle_sha256: Sha256Hex, plan: Plan, now: Millis) -> Self {
        RolloutRecord {
            id,
            bundle_sha256,
            state: RolloutState::Running,
            phase: WavePhase::Dispatching,
            current_wave: 0,
            plan,
            bake_until: None,
            halt_reason: None,
            ack_failures: 0,
            ack_alerts: 0,
            created_at: now,
            updated_at: now,
        }
    }

    fn ack_alarms(&self) -> u32 {
        self.ack_alerts
    }
}

pub struct Engine {
    pub store: Arc<dyn Store>,
    /// Replicas: whether this one drives rollouts, and events to the others.
    pub cluster: Arc<Cluster>,
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    margin: Duration,
    kill_ack_timeout: Duration,
    /// `[[notify]]`: events posted to operators' hooks, never waited for.
    notifier: crate::notify::Notifier,
    /// Hosts dispatched before this instant get their deadline counted from
    /// it: results sent while no controller drove the rollout (this one was
    /// down, or another replica led) arrive late. Set when this replica
    /// becomes the leader.
    started_at: AtomicI64,
    wakers: Mutex<HashMap<RolloutId, Arc<Notify>>>,
    /// The task driving each rollout (on the leader only): one per rollout,
    /// all aborted when the leadership is lost.
    drivers: Mutex<HashMap<RolloutId, tokio::task::AbortHandle>>,
    /// Other replicas' answers to a kill this one took ([`ClusterEvent::KillAcked`]).
    peer_acks: tokio::sync::broadcast::Sender<PeerAcks>,
    /// Registered agents' labels, so a reconnect with unchanged labels
    /// costs no database write.
    known_agents: tokio::sync::Mutex<Option<HashMap<String, BTreeMap<String, String>>>>,
    /// Recently served bundles (content-addressed, so never stale).
    bundle_cache: Mutex<HashMap<Sha256Hex, bytes::Bytes>>,
    /// Run reports on their way to the store (see [`report_writer`]).
    report_tx: tokio::sync::mpsc::Sender<ReportJob>,
    /// Where to ask for active alerts before a start, a resume and each
    /// wave (the level-triggered gates; None: the webhook alone).
    alertmanager: Option<AlertmanagerApi>,
}

/// Bundles kept in memory for download, at most.
const BUNDLE_CACHE: usize = 4;
/// Reports waiting for the writer, at most.
const REPORT_QUEUE: usize = 4096;
/// Reports stored per transaction, at most.
const REPORT_BATCH: usize = 512;

struct ReportJob {
    item: NewReport,
    done: tokio::sync::oneshot::Sender<std::result::Result<ReportOutcome, String>>,
}

/// Stores run reports in batches: whatever has queued up while the previous
/// transaction committed goes into the next one, so a wave of N hosts
/// reporting at once costs a few fsyncs, not N. Each agent's POST is
/// answered only after its report is committed.
async fn report_writer(
    engine: std::sync::Weak<Engine>,
    mut rx: tokio::sync::mpsc::Receiver<ReportJob>,
) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < REPORT_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let Some(engine) = engine.upgrade() else {
            return;
        };
        let items: Vec<NewReport> = jobs.iter().map(|j| j.item.clone()).collect();
        match engine.store.record_reports(&items).await {
            Ok(outcomes) => {
                let mut stored = Vec::new();
                for (job, outcome) in jobs.into_iter().zip(outcomes) {
                    if outcome == ReportOutcome::Stored {
                        let r = &job.item;
                        engine.metrics.observe_report(&r.report);
                        tracing::info!(rollout = %r.rollout_id, host = %r.host, status = ?r.report.status, "run report");
                        engine.wake(&r.rollout_id);
                        if !stored.contains(&r.rollout_id) {
                            stored.push(r.rollout_id.clone());
                        }
                    }
                    let _ = job.done.send(Ok(outcome));
                }
                if !stored.is_empty() {
                    // The leader may be another replica.
                    engine
                        .cluster
                        .publish(ClusterEvent::Reported { ids: stored })
                        .await;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, reports = jobs.len(), "cannot store run reports");
                for job in jobs {
                    let _ = job.done.send(Err(e.to_string()));
                }
            }
        }
    }
}

/// How long a woken rollout task waits for more news before stepping: a
/// step reads every dispatch row of the rollout, so while many hosts are
/// still pending it waits longer (50 ms plus 50 µs per pending host, at most
/// 1 s: a wave of 9,000 hosts is stepped twice a second instead of twenty
/// times, each step reading 10,000 rows). As the wave drains the wait
/// shrinks, so the last report is noticed within ~50 ms.
fn coalesce(pending: usize) -> Duration {
    (Duration::from_millis(50) + Duration::from_micros(50) * pending as u32)
        .min(Duration::from_secs(1))
}

enum EngineStep {
    Done,
    Again,
    /// Wait until the deadline (or news); `usize`: hosts still pending.
    WaitUntil(Option<Millis>, usize),
}

impl Engine {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn Store>,
        cluster: Arc<Cluster>,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        margin: Duration,
        kill_ack_timeout: Duration,
        alertmanager: Option<AlertmanagerApi>,
        notifier: crate::notify::Notifier,
    ) -> Arc<Self> {
        let (report_tx, report_rx) = tokio::sync::mpsc::channel(REPORT_QUEUE);
        let engine = Arc::new(Engine {
            store,
            cluster,
            hub,
            metrics,
            margin,
            kill_ack_timeout,
            notifier,
            started_at: AtomicI64::new(now_ms()),
            wakers: Mutex::new(HashMap::new()),
            drivers: Mutex::new(HashMap::new()),
            peer_acks: tokio::sync::broadcast::Sender::new(64),
            known_agents: tokio::sync::Mutex::new(None),
            bundle_cache: Mutex::new(HashMap::new()),
            report_tx,
            alertmanager,
        });
        tokio::spawn(report_writer(Arc::downgrade(&engine), report_rx));
        let (presence_tx, presence_rx) = tokio::sync::mpsc::unbounded_channel();
        engine.hub.report_presence(crate::presence::PresenceSink {
            replica: engine.cluster.id(),
            tx: presence_tx,
        });
        tokio::spawn(crate::presence::writer(engine.store.clone(), presence_rx));
        engine
    }

    fn waker(&self, id: &RolloutId) -> Arc<Notify> {
        self.wakers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.clone())
            .or_default()
            .clone()
    }

    fn wake(&self, id: &RolloutId) {
        self.waker(id).notify_one();
    }

    /// Drive rollout `id`, if this replica leads and no task drives it yet.
    fn spawn(self: &Arc<Self>, id: RolloutId) {
        if !self.cluster.is_leader() {
            return;
        }
        let mut drivers = self.drivers.lock().unwrap_or_else(|e| e.into_inner());
        if drivers.get(&id).is_some_and(|t| !t.is_finished()) {
            return;
        }
        let me = self.clone();
        let id2 = id.clone();
        let task = tokio::spawn(async move { me.drive(id2).await });
        drivers.insert(id, task.abort_handle());
    }

    // ---- replicas (src/cluster.rs) ---------------------------------------------

    /// This replica now leads: deadlines count from now, every running
    /// rollout is driven from the database, and the orders of their
    /// current waves are announced again (a leader that died between
    /// recording a wave and announcing it leaves hosts owed an order; an
    /// agent that already has it answers from its record).
    ///
    /// The read is retried until it succeeds: given up, no rollout would be
    /// driven (nothing would halt, time out or finish) for as long as this
    /// replica leads, and alone (SQLite) until a restart. The leadership
    /// loop aborts it when it steps down.
    pub async fn became_leader(self: &Arc<Self>) {
        self.started_at.store(now_ms(), AtomicOrdering::SeqCst);
        let mut backoff = Duration::from_millis(500);
        let running = loop {
            match self.store.rollouts_in_state(RolloutState::Running).await {
                Ok(r) => break r,
                Err(e) => {
                    tracing::error!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot read the running rollouts; no rollout is driven until it can be");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        };
        for r in running {
            tracing::info!(rollout = %r.id, wave = r.current_wave, "continuing rollout from the database");
            self.resend_owed(&r).await;
            self.cluster
                .publish(ClusterEvent::Dispatched {
                    id: r.id.clone(),
                    wave: r.current_wave,
                })
                .await;
            self.spawn(r.id);
        }
    }

    /// The leadership is lost: stop driving at once.
    pub fn stepped_down(&self) {
        let mut drivers = self.drivers.lock().unwrap_or_else(|e| e.into_inner());
        for (_, task) in drivers.drain() {
            task.abort();
        }
    }

    /// After this replica missed events (its listening connection was
    /// lost): push the kill state and the owed orders to its agents again.
    pub async fn resync(self: &Arc<Self>) {
        // Agent records other replicas changed meanwhile: read again.
        *self.known_agents.lock().await = None;
        match self.store.kill_state().await {
            Ok(state) => {
                self.hub.broadcast(encode(&Order::KillState(state)));
            }
            Err(e) => tracing::warn!(error = %e, "resync: cannot read the kill state"),
        }
        if let Ok(running) = self.store.rollouts_in_state(RolloutState::Running).await {
            for r in running {
                self.resend_owed(&r).await;
                if self.cluster.is_leader() {
                    self.spawn(r.id.clone());
                    self.wake(&r.id);
                }
            }
        }
    }

    /// Another replica's event.
    pub async fn on_event(self: &Arc<Self>, from: u64, event: ClusterEvent) {
        match event {
            ClusterEvent::KillAcked {
                generation,
                sent,
                pending,
                pending_count,
            } => {
                let _ = self.peer_acks.send(PeerAcks {
                    from,
                    generation,
                    sent,
                    pending,
                    pending_count,
                });
            }
            ClusterEvent::Rollout { id } => {
                self.spawn(id.clone());
                self.wake(&id);
            }
            // Another replica wrote this agent's record: the next
            // registration here compares with the database, not with what
            // this replica saw last (a label set back to that would not be
            // written; a re-enrolled agent would not be listed again).
            ClusterEvent::Agent { name } => {
                if let Some(cache) = self.known_agents.lock().await.as_mut() {
                    cache.remove(&name);
                }
            }
            ClusterEvent::Reported { ids } => {
                for id in ids {
                    self.wake(&id);
                }
            }
            ClusterEvent::Dispatched { id, .. } => {
                if let Ok(Some(r)) = self.store.rollout(&id).await {
                    self.resend_owed(&r).await;
                }
            }
            ClusterEvent::Kill { generation } => match self.store.kill_state().await {
                Ok(state) if state.generation >= generation => {
                    let sent = self.hub.broadcast(encode(&Order::KillState(state)));
                    tracing::warn!(
                        generation,
                        agents = sent.len(),
                        "kill state pushed (changed through another replica)"
                    );
                    // Tell the replica that took the order how its agents
                    // here took it, without holding up other events.
                    let me = self.clone();
                    tokio::spawn(async move {
                        let pending = me
                            .hub
                            .wait_acks(&sent, generation, me.kill_ack_timeout)
                            .await;
                        me.cluster
                            .publish(ClusterEvent::KillAcked {
                                generation,
                                sent: sent.len() as u32,
                                pending_count: pending.len() as u32,
                                pending: pending.into_iter().take(PENDING_NAMES).collect(),
                            })
                            .await;
                    });
                }
                Ok(_) => tracing::warn!(generation, "kill event newer than the database"),
                Err(e) => tracing::error!(error = %e, "cannot read the kill state of a kill event"),
            },
        }
    }

    /// Send rollout `r`'s run order to each agent connected here that was
    /// dispatched and has not reported (while it runs).
    async fn resend_owed(&self, r: &RolloutRecord) {
        if r.state != RolloutState::Running {
            return;
        }
        let owed: Vec<String> = match self.store.dispatches(&r.id).await {
            Ok(d) => d
                .into_iter()
                .filter(|d| d.outcome == Outcome::Dispatched && self.hub.is_connected(&d.host))
                .map(|d| d.host)
                .collect(),
            Err(e) => {
                tracing::warn!(rollout = %r.id, error = %e, "cannot read the owed orders");
                return;
            }
        };
        self.send_local_runs(r, &owed);
    }

    async fn drive(self: Arc<Self>, id: RolloutId) {
        let notify = self.waker(&id);
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (wait, pending) = match self.step(&id).await {
                Ok(EngineStep::Done) => break,
                Ok(EngineStep::Again) => continue,
                Ok(EngineStep::WaitUntil(at, pending)) => (at, pending),
                Err(e) => {
                    tracing::error!(rollout = %id, error = %e, "rollout step failed; retrying");
                    (Some(now_ms() + 1000), 0)
                }
            };
            let woken = match wait {
                Some(at) => {
                    let delay = Duration::from_millis(at.saturating_sub(now_ms()).max(0) as u64);
                    tokio::select! {
                        _ = &mut notified => true,
                        _ = tokio::time::sleep(delay) => false,
                    }
                }
                None => {
                    notified.await;
                    true
                }
            };
            if woken {
                // Coalesce: a wave of N hosts reports N times in a burst;
                // one step afterwards reads the results once, not N times.
                tokio::time::sleep(coalesce(pending)).await;
            }
        }
        tracing::debug!(rollout = %id, "rollout task finished");
    }

    fn deadline(&self, r: &RolloutRecord, d: &DispatchRecord) -> Millis {
        let budget = (r.plan.timeout_secs as i64) * 1000 + self.margin.as_millis() as i64;
        d.dispatched_at
            .max(self.started_at.load(AtomicOrdering::SeqCst))
            + budget
    }

    async fn step(&self, id: &RolloutId) -> Result<EngineStep> {
        let Some(r) = self.store.rollout(id).await? else {
            return Ok(EngineStep::Done);
        };
        if r.state != RolloutState::Running {
            return Ok(EngineStep::Done);
        }
        let wave = r.current_wave as usize;
        if wave >= r.plan.waves.len() {
            if self.store.complete(id).await? {
                tracing::info!(rollout = %id, "rollout completed");
                self.notifier.send(Event::RolloutCompleted {
                    rollout: id.to_string(),
                });
            }
            return Ok(EngineStep::Done);
        }
        let dispatches = self.store.dispatches(id).await?;
        if let Some(reason) = halt_reason(&r, &dispatches) {
            self.halt_internal(id, &reason).await?;
            return Ok(EngineStep::Done);
        }
        let now = now_ms();
        match r.phase {
            WavePhase::Dispatching => {
                // Every wave, whoever made the rollout running: a kill may
                // have missed it (see `halt_if_killed_meanwhile`).
                if self.halt_if_killed(id).await?.is_some() {
                    return Ok(EngineStep::Done);
                }
                let gate = if r.plan.preview {
                    Ok(())
                } else {
                    self.alert_gate(&r.plan.halt_on).await
                };
                if let Err(why) = gate {
                    self.halt_internal(id, &format!("before wave {}: {why}", wave + 1))
                        .await?;
                    return Ok(EngineStep::Done);
                }
                let hosts = &r.plan.waves[wave];
                if !self
                    .store
                    .record_dispatches(id, wave as u32, hosts, now)
                    .await?
                {
                    return Ok(EngineStep::Again);
                }
                self.store
                    .update_progress(id, WavePhase::Awaiting, wave as u32, None)
                    .await?;
                tracing::info!(rollout = %id, wave = wave + 1, hosts = hosts.len(), "wave dispatched");
                self.send_runs(&r, hosts).await;
                Ok(EngineStep::Again)
            }
            WavePhase::Awaiting => {
                let in_wave: Vec<&DispatchRecord> = dispatches
                    .iter()
                    .filter(|d| d.wave as usize == wave)
                    .collect();
                let pending: Vec<&DispatchRecord> = in_wave
                    .iter()
                    .copied()
                    .filter(|d| d.outcome == Outcome::Dispatched)
                    .collect();
                let late: Vec<String> = pending
                    .iter()
                    .filter(|d| now >= self.deadline(&r, d))
                    .map(|d| d.host.clone())
                    .collect();
                if !late.is_empty() {
                    tracing::warn!(rollout = %id, hosts = ?late, "hosts timed out");
                    self.store.mark_timed_out(id, &late).await?;
                    return Ok(EngineStep::Again);
                }
                if pending.is_empty() {
                    let bake_ms = r.plan.bake_secs.min(MAX_BAKE_SECS) as i64 * 1000;
                    let until = now.saturating_add(bake_ms);
                    self.store
                        .update_progress(id, WavePhase::Baking, wave as u32, Some(until))
                        .await?;
                    tracing::info!(rollout = %id, wave = wave + 1, bake_secs = r.plan.bake_secs, "wave finished; baking");
                    return Ok(EngineStep::Again);
                }
                Ok(EngineStep::WaitUntil(
                    pending.iter().map(|d| self.deadline(&r, d)).min(),
                    pending.len(),
                ))
            }
            WavePhase::Baking => {
                let until = r.bake_until.unwrap_or(now);
                if now < until {
                    return Ok(EngineStep::WaitUntil(Some(until), 0));
                }
                self.store
                    .update_progress(id, WavePhase::Dispatching, wave as u32 + 1, None)
                    .await?;
                Ok(EngineStep::Again)
            }
        }
    }

    /// Send a wave's run orders: to the agents connected here, and through
    /// the other replicas to theirs.
    async fn send_runs(&self, r: &RolloutRecord, hosts: &[String]) {
        self.send_local_runs(r, hosts);
        self.cluster
            .publish(ClusterEvent::Dispatched {
                id: r.id.clone(),
                wave: r.current_wave,
            })
            .await;
    }

    fn send_local_runs(&self, r: &RolloutRecord, hosts: &[String]) {
        let line = encode(&run_order(
            r.plan.preview,
            r.plan.retry_of.is_some(),
            r.id.clone(),
            r.bundle_sha256.clone(),
            r.plan.bundle.size,
        ));
        for h in hosts {
            self.hub.send(h, line.clone());
        }
    }

    /// The level-triggered alert gate: `Err(why)` when an active alert
    /// (neither silenced nor inhibited) matches `halt_on`, or when
    /// Alertmanager cannot say (fail closed: the alert state is unknown).
    /// Always `Ok` without `[alertmanager]` in the configuration.
    async fn alert_gate(&self, halt_on: &Matchers) -> std::result::Result<(), String> {
        let Some(api) = &self.alertmanager else {
            return Ok(());
        };
        match api.active_alerts().await {
            Err(e) => {
                self.metrics.alert_gate_errors.inc();
                tracing::warn!(url = %api.url, error = %e, "cannot ask Alertmanager for active alerts");
                Err(format!(
                    "alert state unknown: cannot get the active alerts from Alertmanager at {}: {e}",
                    api.url
                ))
            }
            Ok(alerts) => match alerts.iter().find(|a| a.matches(halt_on)) {
                Some(a) => Err(format!(
                    "alert {} is firing ({}), matching halt_on {halt_on}",
                    a.name(),
                    a.describe()
                )),
                None => Ok(()),
            },
        }
    }

    async fn halt_internal(&self, id: &RolloutId, reason: &str) -> Result<bool> {
        let halted = self.store.halt(id, reason).await?;
        if halted {
            self.after_halt(id, reason).await?;
        }
        Ok(halted)
    }

    /// What follows an automatic halt once it is durable: the log, the
    /// operator log, `[[notify]]`, and the rollout's task.
    async fn after_halt(&self, id: &RolloutId, reason: &str) -> Result<()> {
        self.notify_halted(id, reason).await;
        tracing::warn!(rollout = %id, %reason, "rollout halted");
        self.store
            .append_operator_log(
                "controller",
                "rollout.halted",
                &serde_json::json!({ "rollout": id, "reason": reason }),
            )
            .await?;
        self.wake(id);
        Ok(())
    }

    /// Tell `[[notify]]` a rollout halted, with its first denials.
    async fn notify_halted(&self, id: &RolloutId, reason: &str) {
        // The denials are a courtesy: a store error leaves them out, it
        // does not keep the halt from being announced.
        let dispatches = self.store.dispatches(id).await.unwrap_or_default();
        let denials = dispatches
            .iter()
            .filter_map(|d| match &d.outcome {
                Outcome::Reported(r) => Some((&d.host, r)),
                _ => None,
            })
            .flat_map(|(host, r)| {
                r.denials.iter().flatten().map(move |x| {
                    serde_json::json!({ "host": host, "access": x.access, "path": x.path })
                })
            })
            .take(crate::notify::FIRST_DENIALS)
            .collect();
        self.notifier.send(Event::RolloutHalted {
            rollout: id.to_string(),
            reason: reason.to_string(),
            denials,
        });
    }

    // ---- operator actions ---------------------------------------------------

    /// Compute the plan of a rollout without starting it.
    pub async fn plan(&self, req: &RolloutRequest) -> Result<(Plan, BundleMeta)> {
        let meta = self
            .store
            .bundle_meta(&req.bundle_sha256)
            .await?
            .ok_or_else(|| {
                EngineError::NotFound(format!("bundle {} was not uploaded", req.bundle_sha256))
            })?;
        let manifest = Manifest::parse(&meta.manifest).map_err(|e| {
            EngineError::BadRequest(format!("stored bundle manifest is invalid: {e}"))
        })?;
        let agents = self.store.list_agents().await?;
        let in_scope: Vec<String> = agents
            .iter()
            .filter(|a| {
                manifest.targets.matches(&HostIdentity {
                    name: a.name.clone(),
                    labels: a.labels.clone(),
                })
            })
            .map(|a| a.name.clone())
            .collect();
        if in_scope.is_empty() {
            return Err(EngineError::BadRequest(format!(
                "no registered agent matches the bundle's targets ({} agents registered)",
                agents.len()
            )));
        }
        let out_of_scope = agents.len() - in_scope.len();
        let (in_scope, left_out) =
            narrow(in_scope, &req.limit, &req.exclude).map_err(EngineError::BadRequest)?;
        // A host that is not connected now would only time out and halt
        // the rollout: it is left out (and named) unless asked for.
        let online = self.online_agents().await;
        let offline: Vec<String> = in_scope
            .iter()
            .filter(|h| !online.contains(*h))
            .cloned()
            .collect();
        let in_scope: Vec<String> = if req.include_offline {
            in_scope
        } else {
            in_scope
                .into_iter()
                .filter(|h| online.contains(h))
                .collect()
        };
        if in_scope.is_empty() {
            return Err(EngineError::BadRequest(format!(
                "every in-scope host is offline ({}); pass --include-offline to send to them anyway",
                offline.join(", ")
            )));
        }
        let total = in_scope.len();
        if req.preview && req.after_preview.is_some() {
            return Err(EngineError::BadRequest(
                "a preview cannot follow a preview (--preview with --after-preview)".into(),
            ));
        }
        if req.bake_secs > MAX_BAKE_SECS {
            return Err(EngineError::BadRequest(format!(
                "a bake of {} s is longer than the longest allowed ({MAX_BAKE_SECS} s, 30 days)",
                req.bake_secs
            )));
        }
        // A preview goes to every in-scope host at once: it changes nothing.
        let waves = if req.preview {
            vec![in_scope]
        } else {
            compute_waves(in_scope, &req.canaries, &req.waves).map_err(EngineError::BadRequest)?
        };
        if total > 1
            && waves.first().map(Vec::len) == Some(total)
            && !req.all_at_once
            && !req.preview
        {
            return Err(EngineError::BadRequest(format!(
                "the first wave would be every in-scope host ({total}): no canary. \
                 Start smaller (e.g. --waves 1,25%,100%) or pass --all-at-once"
            )));
        }
        let halt_on = if req.halt_on.is_empty() {
            default_halt_on()
        } else {
            req.halt_on.clone()
        };
        let plan = Plan {
            bundle: BundleSummary {
                sha256: meta.sha256.clone(),
                name: meta.name.clone(),
                version: meta.version,
                size: meta.size,
            },
            targets: serde_json::to_value(&manifest.targets).unwrap_or_default(),
            scope: plan_scope(&manifest),
            services: if manifest.services.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::to_value(&manifest.services).unwrap_or_default()
            },
            signers: meta.signers.clone(),
            timeout_secs: manifest.run.timeout.as_secs(),
            bake_secs: if req.preview { 0 } else { req.bake_secs },
            max_failures: req.max_failures,
            halt_on,
            waves,
            out_of_scope,
            left_out,
            offline,
            include_offline: req.include_offline,
            preview: req.preview,
            after_preview: None,
            retry_of: None,
        };
        Ok((plan, meta))
    }

    pub async fn start(
        self: &Arc<Self>,
        req: &RolloutRequest,
        actor: &str,
    ) -> Result<RolloutStatus> {
        if let Some(k) = self.store.kill_state().await?.all {
            return Err(EngineError::Conflict(format!(
                "a fleet-wide kill is in force ({}, by {}); lift it before starting rollouts",
                k.reason, k.by
            )));
        }
        let (mut plan, meta) = self.plan(req).await?;
        if let Some(preview_id) = &req.after_preview {
            plan.after_preview = Some(
                self.check_after_preview(preview_id, &plan, req.override_reason.as_deref())
                    .await?,
            );
        }
        let gate = if plan.preview {
            Ok(())
        } else {
            self.alert_gate(&plan.halt_on).await
        };
        if let Err(why) = gate {
            tracing::warn!(bundle = %meta.name, %why, by = %actor, "rollout not started");
            return Err(EngineError::Conflict(format!(
                "not starting the rollout: {why}"
            )));
        }
        let now = now_ms();
        let id = new_rollout_id(now, &meta.sha256)?;
        let record = RolloutRecord::starting(id.clone(), meta.sha256.clone(), plan, now);
        self.store
            .append_operator_log(
                actor,
                "rollout.start",
                &serde_json::json!({ "rollout": id, "bundle": meta.sha256, "name": meta.name, "version": meta.version,
                                     "waves": record.plan.waves, "preview": record.plan.preview,
                                     "after_preview": record.plan.after_preview }),
            )
            .await?;
        self.store.create_rollout(&record).await?;
        self.halt_if_killed_meanwhile(&id).await?;
        tracing::info!(rollout = %id, bundle = %meta.name, version = meta.version, "rollout started");
        self.notifier.send(Event::RolloutStarted {
            rollout: id.to_string(),
            bundle: meta.name.clone(),
            version: meta.version,
            hosts: record.plan.waves.iter().map(Vec::len).sum(),
            by: actor.to_string(),
        });
        self.spawn(id.clone());
        self.cluster
            .publish(ClusterEvent::Rollout { id: id.clone() })
            .await;
        self.status(&id).await
    }

    /// Whether a rollout may follow preview `preview_id`: a completed
    /// preview of the same bundle that covered every host of `plan`, each
    /// of which reported success with no denial (an unknown count is not
    /// zero), no service action its policy refuses and no limit hit.
    /// Anything else is refused unless `override_reason` says why, and
    /// that reason goes into the operator log with the rollout.
    async fn check_after_preview(
        &self,
        preview_id: &RolloutId,
        plan: &Plan,
        override_reason: Option<&str>,
    ) -> Result<AfterPreview> {
        let preview =
            self.store.rollout(preview_id).await?.ok_or_else(|| {
                EngineError::NotFound(format!("no rollout {preview_id} to follow"))
            })?;
        if !preview.plan.preview {
            return Err(EngineError::BadRequest(format!(
                "{preview_id} is not a preview rollout"
            )));
        }
        if preview.bundle_sha256 != plan.bundle.sha256 {
            return Err(EngineError::BadRequest(format!(
                "{preview_id} previewed another bundle ({}), not {}",
                preview.bundle_sha256, plan.bundle.sha256
            )));
        }
        let dispatches = self.store.dispatches(preview_id).await?;
        let mut problems = Vec::new();
        if preview.state != RolloutState::Completed {
            problems.push(format!("the preview is {}", preview.state.as_str()));
        }
        for host in plan.waves.iter().flatten() {
            match dispatches
                .iter()
                .find(|d| &d.host == host)
                .map(|d| &d.outcome)
            {
                None => problems.push(format!("{host} was not previewed")),
                Some(Outcome::Dispatched) => problems.push(format!("{host} has not reported")),
                Some(Outcome::TimedOut) => problems.push(format!("{host} timed out")),
                Some(Outcome::Reported(r)) => {
                    match &r.preview {
                        Some(p) if !p.complete => {
                            problems.push(format!("{host}'s changes could not all be read"))
                        }
                        Some(p) if p.changes_dropped > 0 => problems.push(format!(
                            "{host} would make {} more changes than its report lists",
                            p.changes_dropped
                        )),
                        _ => {}
                    }
                    if r.status != RunStatus::Succeeded || r.is_alert() || r.preview.is_none() {
                        problems.push(
                            match describe_alarm(&DispatchRecord {
                                rollout_id: preview_id.clone(),
                                host: host.clone(),
                                wave: 0,
                                outcome: Outcome::Reported(r.clone()),
                                dispatched_at: 0,
                                reported_late: false,
                            }) {
                                Some(why) => why,
                                None => format!(
                                    "{host} {:?}: {}",
                                    r.status,
                                    r.reason.as_deref().unwrap_or("no reason given")
                                ),
                            },
                        );
                    }
                }
            }
        }
        if problems.is_empty() {
            return Ok(AfterPreview {
                rollout: preview_id.clone(),
                override_reason: None,
            });
        }
        let shown = problems
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ");
        match override_reason.map(str::trim).filter(|r| !r.is_empty()) {
            Some(reason) => {
                tracing::warn!(preview = %preview_id, %reason, problems = %shown, "starting after an unclean preview: overridden");
                Ok(AfterPreview {
                    rollout: preview_id.clone(),
                    override_reason: Some(reason.to_string()),
                })
            }
            None => Err(EngineError::Conflict(format!(
                "the preview {preview_id} is not clean ({} problem(s): {shown}); start with --override-reason to go ahead anyway",
                problems.len()
            ))),
        }
    }

    pub async fn status(&self, id: &RolloutId) -> Result<RolloutStatus> {
        let r = self
            .store
            .rollout(id)
            .await?
            .ok_or_else(|| EngineError::NotFound(format!("no rollout {id}")))?;
        let dispatches = self.store.dispatches(id).await?;
        Ok(status_of(r, dispatches))
    }

    pub async fn list(&self) -> Result<Vec<RolloutStatus>> {
        let mut out = Vec::new();
        for r in self.store.rollouts().await? {
            let d = self.store.dispatches(&r.id).await?;
            out.push(status_of(r, d));
        }
        Ok(out)
    }

    pub async fn halt(&self, id: &RolloutId, reason: &str, actor: &str) -> Result<RolloutStatus> {
        let r = self
            .store
            .rollout(id)
            .await?
            .ok_or_else(|| EngineError::NotFound(format!("no rollout {id}")))?;
        if r.state != RolloutState::Running {
            return Err(EngineError::Conflict(format!(
                "rollout {id} is {}, not running",
                r.state.as_str()
            )));
        }
        let reason = format!("halted by {actor}: {reason}");
        self.store
            .append_operator_log(
                actor,
                "rollout.halt",
                &serde_json::json!({ "rollout": id, "reason": reason }),
            )
            .await?;
        if self.store.halt(id, &reason).await? {
            self.notify_halted(id, &reason).await;
        }
        self.wake(id);
        self.cluster
            .publish(ClusterEvent::Rollout { id: id.clone() })
            .await;
        self.status(id).await
    }

    pub async fn resume(
        self: &Arc<Self>,
        id: &RolloutId,
        reason: Option<&str>,
        actor: &str,
    ) -> Result<RolloutStatus> {
        let r = self
            .store
            .rollout(id)
            .await?
            .ok_or_else(|| EngineError::NotFound(format!("no rollout {id}")))?;
        if r.state != RolloutState::Halted {
            return Err(EngineError::Conflict(format!(
                "rollout {id} is {}, not halted",
                r.state.as_str()
            )));
        }
        if let Some(k) = self.store.kill_state().await?.covering(id) {
            return Err(EngineError::Conflict(format!(
                "a kill order is in force for rollout {id} ({}); lift it first",
                k.reason
            )));
        }
        if let Err(why) = self.alert_gate(&r.plan.halt_on).await {
            tracing::warn!(rollout = %id, %why, by = %actor, "rollout not resumed");
            return Err(EngineError::Conflict(format!(
                "not resuming rollout {id}: {why}"
            )));
        }
        let t = tally(&self.store.dispatches(id).await?);
        self.store
            .append_operator_log(
                actor,
                "rollout.resume",
                &serde_json::json!({ "rollout": id, "acknowledged_failures": t.failures, "acknowledged_alarms": t.alarms,
                                     "halt_reason": r.halt_reason, "reason": reason }),
            )
            .await?;
        if !self.store.resume(id, t.failures, t.alarms).await? {
            return Err(EngineError::Conflict(format!(
                "rollout {id} changed state; try again"
            )));
        }
        self.halt_if_killed_meanwhile(id).await?;
        tracing::info!(rollout = %id, by = %actor, "rollout resumed");
        self.spawn(id.clone());
        self.cluster
            .publish(ClusterEvent::Rollout { id: id.clone() })
            .await;
        self.status(id).await
    }

    /// A run report from `host`.
    pub async fn ingest_report(&self, host: &str, report: AgentReport) -> Result<ReportOutcome> {
        if report.report.host != host {
            return Err(EngineError::Forbidden(format!(
                "report names host {:?} but the certificate is {host:?}",
                report.report.host
            )));
        }
        let (done, answer) = tokio::sync::oneshot::channel();
        let item = NewReport {
            rollout_id: report.rollout_id.clone(),
            host: host.to_string(),
            report: report.report,
            at: now_ms(),
        };
        let unavailable = || StoreError::Unavailable("the report writer stopped".into());
        self.report_tx
            .send(ReportJob { item, done })
            .await
            .map_err(|_| unavailable())?;
        let outcome = answer
            .await
            .map_err(|_| unavailable())?
            .map_err(StoreError::Unavailable)?;
        match outcome {
            ReportOutcome::Stored | ReportOutcome::Duplicate => {}
            ReportOutcome::NotDispatched => {
                return Err(EngineError::NotFound(format!(
                    "rollout {} was never dispatched to {host}",
                    report.rollout_id
                )))
            }
        }
        Ok(outcome)
    }

    // ---- alerts -----------------------------------------------------------------

    pub async fn alert(&self, payload: &AlertmanagerPayload, actor: &str) -> Result<AlertResponse> {
        let firing: Vec<_> = payload.firing().collect();
        let mut halted = Vec::new();
        if !firing.is_empty() {
            for r in self.store.rollouts_in_state(RolloutState::Running).await? {
                if let Some(alert) = firing.iter().find(|a| a.matches(&r.plan.halt_on)) {
                    let reason = format!("alert {} fired ({})", alert.name(), alert.describe());
                    self.store
                        .append_operator_log(
                            actor,
                            "alert.halt",
                            &serde_json::json!({ "rollout": r.id, "alert": alert.labels }),
                        )
                        .await?;
                    if self.halt_internal(&r.id, &reason).await? {
                        halted.push(r.id.clone());
                    }
                }
            }
        }
        tracing::info!(
            firing = firing.len(),
            halted = halted.len(),
            "alertmanager webhook"
        );
        Ok(AlertResponse {
            firing: firing.len() as u32,
            halted_rollouts: halted,
        })
    }

    // ---- agents -------------------------------------------------------------------

    /// Register (or refresh) an agent; the database is written only when its
    /// labels changed, so reconnect storms cost no writes.
    pub async fn register_agent(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<()> {
        // The cache is held across the write: a removal or another
        // replica's event that came in between would otherwise be undone
        // by the insert below (the cache saying "known" of a deleted row).
        // Misses are rare (labels changed, a new agent); hits stay cheap.
        let mut cache = self.known_agents.lock().await;
        if cache.is_none() {
            let all = self.store.list_agents().await?;
            *cache = Some(all.into_iter().map(|a| (a.name, a.labels)).collect());
        }
        if cache.as_ref().and_then(|c| c.get(name)) == Some(labels) {
            return Ok(());
        }
        self.store
            .upsert_agent(&AgentRecord {
                name: name.to_string(),
                labels: labels.clone(),
                inventory: Default::default(),
            })
            .await?;
        if let Some(c) = cache.as_mut() {
            c.insert(name.to_string(), labels.clone());
        }
        drop(cache);
        self.cluster
            .publish(ClusterEvent::Agent {
                name: name.to_string(),
            })
            .await;
        Ok(())
    }

    /// What to send a freshly connected agent: the kill state, then every
    /// run order it is still owed.
    pub async fn greeting(&self, host: &str) -> Result<Vec<Order>> {
        let mut out = vec![Order::KillState(self.store.kill_state().await?)];
        for p in self.store.pending_orders(host).await? {
            out.push(run_order(
                p.preview,
                p.retry,
                p.rollout_id,
                p.bundle_sha256,
                p.bundle_size,
            ));
        }
        Ok(out)
    }

    /// A bundle's bytes, shared: a wave of agents downloading the same
    /// bundle at once costs one copy in memory, not one per agent.
    pub async fn bundle_bytes(&self, sha: &Sha256Hex) -> Result<bytes::Bytes> {
        if let Some(b) = self
            .bundle_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(sha)
        {
            return Ok(b.clone());
        }
        let bytes: bytes::Bytes = self
            .store
            .bundle_bytes(sha)
            .await?
            .ok_or_else(|| EngineError::NotFound(format!("no bundle {sha}")))?
            .into();
        let mut cache = self.bundle_cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= BUNDLE_CACHE {
            cache.clear();
        }
        cache.insert(sha.clone(), bytes.clone());
        Ok(bytes)
    }
}

/// A new rollout's id: its start time and the bundle's digest.
fn new_rollout_id(now: Millis, sha: &Sha256Hex) -> Result<RolloutId> {
    let stamp = jiff::Timestamp::now().strftime("%Y%m%d-%H%M%S").to_string();
    RolloutId::parse(&format!(
        "r-{stamp}-{:03}-{}",
        now.rem_euclid(1000),
        &sha.as_str()[..8]
    ))
    .map_err(|e| EngineError::BadRequest(e.to_string()))
}

/// The order that runs a rollout's bundle on a host: a preview, for real,
/// or for real as a retry (a rollout made by `rollout retry`).
fn run_order(
    preview: bool,
    retry: bool,
    rollout_id: RolloutId,
    bundle_sha256: Sha256Hex,
    bundle_size: u64,
) -> Order {
    if preview {
        Order::Preview {
            rollout_id,
            bundle_sha256,
            bundle_size,
        }
    } else {
        Order::Run {
            rollout_id,
            bundle_sha256,
            bundle_size,
            retry,
        }
    }
}

pub fn status_of(r: RolloutRecord, dispatches: Vec<DispatchRecord>) -> RolloutStatus {
    let mut by_host: HashMap<String, DispatchRecord> = dispatches
        .into_iter()
        .map(|d| (d.host.clone(), d))
        .collect();
    let mut hosts = Vec::new();
    for (w, wave) in r.plan.waves.iter().enumerate() {
        for h in wave {
            let (state, report) = match by_host.remove(h).map(|d| d.outcome) {
                None => ("pending".to_string(), None),
                Some(Outcome::Dispatched) => ("dispatched".to_string(), None),
                Some(Outcome::TimedOut) => ("timed_out".to_string(), None),
                Some(Outcome::Reported(rep)) => {
                    let s = serde_json::to_value(rep.status)
                        .ok()
                        .and_then(|v| v.as_str().map(String::from));
                    (s.unwrap_or_else(|| "reported".into()), Some(*rep))
                }
            };
            hosts.push(HostRun {
                host: h.clone(),
                wave: w as u32,
                state,
                report,
            });
        }
    }
    RolloutStatus {
        id: r.id,
        state: r.state,
        phase: r.phase,
        current_wave: r.current_wave,
        wave_count: r.plan.waves.len() as u32,
        bake_until: r.bake_until.map(rfc3339),
        halt_reason: r.halt_reason,
        plan: r.plan,
        hosts,
        created_at: rfc3339(r.created_at),
        updated_at: rfc3339(r.updated_at),
    }
}

mod halt_rules;
mod inventory;
mod kill;
mod retry;

use halt_rules::describe_alarm;
pub use halt_rules::{halt_reason, tally, Tally};
pub use kill::PeerAcks;
pub use retry::{retry_selection, retry_waves};

#[cfg(test)]
mod tests;

/// The plan's scope: the author's, with the scope derived from the
/// packages (if any) under `packages`, so the plan shows both and where
/// each came from.
fn plan_scope(manifest: &rollguard_shared::Manifest) -> serde_json::Value {
    let mut scope = serde_json::to_value(&manifest.scope).unwrap_or_default();
    if let (Some(p), Some(obj)) = (&manifest.packages, scope.as_object_mut()) {
        obj.insert(
            "packages".into(),
            serde_json::to_value(p).unwrap_or_default(),
        );
    }
    scope
}
