//! Controller replicas on one PostgreSQL database: who drives rollouts, and
//! how what one replica does reaches the agents connected to the others.
//!
//! - **Leader.** Exactly one replica drives rollouts (waves, deadlines,
//!   halts on results). It holds a session-level PostgreSQL advisory lock
//!   on a connection of its own and checks that connection every second.
//!   When the leader dies its connection closes, PostgreSQL releases the
//!   lock at once, and another replica (trying every second) takes over and
//!   resumes every running rollout from the database. A leader that loses
//!   its lock connection stops driving before anything else.
//! - **Events.** Replicas tell each other what happened with `NOTIFY` on
//!   one channel ([`Event`]): a wave was dispatched (each replica sends the
//!   run orders to the agents connected to it), reports were stored (the
//!   leader steps those rollouts), a rollout was started, resumed or halted
//!   (the leader drives it), the kill state changed (each replica pushes it
//!   to its agents). Each time a replica starts listening (at start, and
//!   after a lost connection) it resyncs: it pushes the kill state and
//!   re-sends owed orders, so an agent that got its greeting before the
//!   replica listened misses nothing.
//! - **SQLite** is one controller: [`Cluster::alone`] is always the leader
//!   and has no peers.
//!
//! "At most once per host" does not depend on there being one leader: a
//! dispatch is a row keyed by (rollout, host), inserted only while the
//! rollout runs, and an agent answers a repeated order from its own record
//! without running again. Two leaders for a moment (the old one has not yet
//! noticed that its lock connection died) can only repeat orders.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rollguard_shared::protocol::RolloutId;
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgListener, PgPool};
use sqlx::Connection;

use crate::engine::Engine;

/// The `NOTIFY` channel.
const CHANNEL: &str = "rollguard_events";
/// The advisory lock key of leadership ("rgleader").
const LEADER_LOCK: i64 = 0x7267_6c65_6164_6572;
/// How often a follower tries to become leader, and the leader checks its
/// lock connection.
const LEADER_CHECK: Duration = Duration::from_secs(1);

/// What one replica tells the others.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// Started, resumed or halted: the leader (re)examines it.
    Rollout { id: RolloutId },
    /// Wave `wave` of rollout `id` was recorded as dispatched.
    Dispatched { id: RolloutId, wave: u32 },
    /// Reports of these rollouts were stored.
    Reported { ids: Vec<RolloutId> },
    /// The kill state changed (its new generation).
    Kill { generation: u64 },
    /// This agent's record changed (new labels, or removed): what a
    /// replica remembers of it is stale.
    Agent { name: String },
    /// How the sender's agents took kill state `generation`: to how many it
    /// was sent, and which had not acknowledged within the kill
    /// acknowledgement timeout (at most [`PENDING_NAMES`] names, all counted).
    KillAcked {
        generation: u64,
        sent: u32,
        pending: Vec<String>,
        pending_count: u32,
    },
}

/// Names of unacknowledging agents carried in one [`Event::KillAcked`]
/// (a `NOTIFY` payload holds at most 8,000 bytes).
pub const PENDING_NAMES: usize = 50;
/// A replica whose heartbeat is older than this is not waited for.
const REPLICA_ALIVE_MS: i64 = 3000;

/// One event as sent: who sent it, so a replica skips its own.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    from: u64,
    event: Event,
}

pub struct Cluster {
    /// This replica's id in events (random per process).
    me: u64,
    /// How the inventory names this replica: host name and port.
    name: String,
    leader: AtomicBool,
    pool: Option<PgPool>,
}

impl Cluster {
    /// One controller (SQLite): the leader from the start, no peers.
    pub fn alone() -> Arc<Cluster> {
        Self::alone_named(crate::presence::host_name())
    }

    /// [`Cluster::alone`], named `name` in the inventory.
    pub fn alone_named(name: String) -> Arc<Cluster> {
        Arc::new(Cluster {
            me: 0,
            name,
            leader: AtomicBool::new(true),
            pool: None,
        })
    }

    /// A replica among others on the database behind `pool`; a follower
    /// until [`Cluster::run`] wins the leadership.
    pub fn replica(pool: PgPool, name: String) -> Arc<Cluster> {
        Arc::new(Cluster {
            name,
            // Kept within i64 for the `replicas` table.
            me: rand_id() >> 1,
            leader: AtomicBool::new(false),
            pool: Some(pool),
        })
    }

    /// This replica's id (0 alone): what the inventory's `connected_to` holds.
    pub fn id(&self) -> u64 {
        self.me
    }

    /// How the inventory names this replica (host name and port).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }

    /// Tell the other replicas (none when alone). Best effort: a lost event
    /// is made up for by the resync after a reconnect and by the agents'
    /// own reconnects, so a failure is logged, not returned.
    pub async fn publish(&self, event: Event) {
        let Some(pool) = &self.pool else {
            return;
        };
        let payload = match serde_json::to_string(&Envelope {
            from: self.me,
            event,
        }) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a cluster event");
                return;
            }
        };
        if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(&payload)
            .execute(pool)
            .await
        {
            tracing::warn!(error = %e, "cannot notify the other replicas");
        }
    }

    /// Run the replica's background work: leadership and events. Alone, it
    /// only makes the engine the leader.
    pub async fn run(self: Arc<Self>, engine: Arc<Engine>) {
        let Some(pool) = self.pool.clone() else {
            // Spawned: it retries until the database answers, and the
            // server must listen meanwhile (the kill switch above all).
            tokio::spawn(async move { engine.became_leader().await });
            return;
        };
        tokio::spawn(self.clone().listen(pool.clone(), engine.clone()));
        tokio::spawn(self.clone().heartbeat(pool.clone()));
        tokio::spawn(self.lead(pool, engine));
    }

    /// Say every second that this replica is alive (the `replicas` table),
    /// so that a kill taken by another replica waits for its answer.
    async fn heartbeat(self: Arc<Self>, pool: PgPool) {
        loop {
            let done = sqlx::query(
                "INSERT INTO replicas (id, seen_at, host) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at, host = excluded.host",
            )
            .bind(self.me as i64)
            .bind(crate::store::now_ms())
            .bind(&self.name)
            .execute(&pool)
            .await;
            if let Err(e) = done {
                tracing::debug!(error = %e, "replica heartbeat");
            }
            tokio::time::sleep(LEADER_CHECK).await;
        }
    }

    /// The other replicas alive now (none when alone, or when the database
    /// cannot say: then nothing is waited for, and the counts are this
    /// replica's alone, as without replicas).
    pub async fn live_peers(&self) -> Vec<u64> {
        self.live_peer_hosts().await.into_keys().collect()
    }

    /// The other replicas alive now, with the host each runs on (none when
    /// alone, or when the database cannot say: then only this replica's
    /// own agents count as connected).
    pub async fn live_peer_hosts(&self) -> std::collections::HashMap<u64, String> {
        let Some(pool) = &self.pool else {
            return Default::default();
        };
        let since = crate::store::now_ms() - REPLICA_ALIVE_MS;
        match sqlx::query_as::<_, (i64, String)>(
            "SELECT id, host FROM replicas WHERE seen_at > $1 AND id <> $2",
        )
        .bind(since)
        .bind(self.me as i64)
        .fetch_all(pool)
        .await
        {
            Ok(rows) => rows.into_iter().map(|(i, h)| (i as u64, h)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the live replicas");
                Default::default()
            }
        }
    }

    /// Try for the leadership every second; while leader, check the lock's
    /// connection every second and step down the moment it fails.
    async fn lead(self: Arc<Self>, pool: PgPool, engine: Arc<Engine>) {
        loop {
            match self.try_lead(&pool, &engine).await {
                Ok(()) => {}
                Err(e) => tracing::warn!(error = %e, "leadership: database unavailable"),
            }
            if self.leader.swap(false, Ordering::SeqCst) {
                tracing::warn!("stepping down: the leadership lock's connection is gone");
                engine.stepped_down();
            }
            tokio::time::sleep(LEADER_CHECK).await;
        }
    }

    /// Ok(()) when the lock was not won; returns only on a lost connection
    /// when it was.
    async fn try_lead(&self, pool: &PgPool, engine: &Arc<Engine>) -> sqlx::Result<()> {
        // A connection of its own: the lock lives as long as it does.
        let mut conn = pool.acquire().await?.detach();
        let won: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(LEADER_LOCK)
            .fetch_one(&mut conn)
            .await?;
        if !won {
            let _ = conn.close().await;
            return Ok(());
        }
        self.leader.store(true, Ordering::SeqCst);
        tracing::info!("leader: driving rollouts");
        // Beside the lock's pings, not before them: it retries until the
        // database answers, and the lock may be lost meanwhile (then it is
        // aborted when this returns).
        let _taking_over = crate::http_out::AbortOnDrop(tokio::spawn({
            let engine = engine.clone();
            async move { engine.became_leader().await }
        }));
        loop {
            tokio::time::sleep(LEADER_CHECK).await;
            let alive = tokio::time::timeout(LEADER_CHECK, conn.ping()).await;
            match alive {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(sqlx::Error::PoolTimedOut),
            }
        }
    }

    /// Listen for the other replicas' events; after a lost connection,
    /// resync (what was sent meanwhile is gone).
    async fn listen(self: Arc<Self>, pool: PgPool, engine: Arc<Engine>) {
        let mut first = true;
        loop {
            let mut listener = match PgListener::connect_with(&pool).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster events: cannot connect");
                    tokio::time::sleep(LEADER_CHECK).await;
                    continue;
                }
            };
            if let Err(e) = listener.listen(CHANNEL).await {
                tracing::warn!(error = %e, "cluster events: cannot listen");
                tokio::time::sleep(LEADER_CHECK).await;
                continue;
            }
            // Listening now; what was committed before is read here: owed
            // orders of agents that connected (and got their greeting)
            // before this replica listened, or while it did not.
            if !first {
                tracing::info!("cluster events: listening again");
            }
            first = false;
            engine.resync().await;
            loop {
                match listener.try_recv().await {
                    Ok(Some(n)) => match serde_json::from_str::<Envelope>(n.payload()) {
                        Ok(env) if env.from == self.me => {}
                        Ok(env) => engine.on_event(env.from, env.event).await,
                        Err(e) => tracing::warn!(error = %e, "ignoring a malformed cluster event"),
                    },
                    Ok(None) => {
                        tracing::warn!("cluster events: connection lost; reconnecting");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster events: connection failed");
                        tokio::time::sleep(LEADER_CHECK).await;
                        break;
                    }
                }
            }
        }
    }
}

/// A replica id, random: it only tells replicas apart in events.
fn rand_id() -> u64 {
    use rand_core::RngCore;
    rand_core::OsRng.next_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_unknown_fields_are_refused() {
        let env = Envelope {
            from: 7,
            event: Event::Dispatched {
                id: RolloutId::parse("r-1").unwrap(),
                wave: 2,
            },
        };
        let text = serde_json::to_string(&env).unwrap();
        assert_eq!(
            text,
            r#"{"from":7,"event":{"event":"dispatched","id":"r-1","wave":2}}"#
        );
        let back: Envelope = serde_json::from_str(&text).unwrap();
        assert_eq!(back.event, env.event);
        assert!(
            serde_json::from_str::<Envelope>(r#"{"from":1,"event":{"event":"kill"}}"#).is_err()
        );
    }
}
