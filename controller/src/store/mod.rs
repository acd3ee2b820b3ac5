//! Durable controller state behind one trait, with two backends:
//! [`sqlite::SqliteStore`] (one controller, no setup: the default) and
//! [`postgres::PostgresStore`] (replicas sharing one database). Both apply
//! `migrations/<backend>/` with sqlx's migrator when opened.
//!
//! The rule the engine relies on: a dispatch is committed here *before* the
//! order is sent, and every state change that forbids further dispatch
//! (halt, kill) is a conditional update, so "halted" can never be overwritten
//! by a racing wave transition.

mod decode;
pub mod postgres;
pub mod sqlite;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use rollguard_shared::protocol::{
    KillOrder, KillScope, KillState, Plan, RolloutId, RolloutState, Sha256Hex, WavePhase,
};
use rollguard_shared::report::RunReport;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("schema migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

pub fn now_ms() -> Millis {
    jiff::Timestamp::now().as_millisecond()
}

pub fn rfc3339(ms: Millis) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// An opened store; `postgres` is its pool when replicas may share it
/// (what `crate::cluster` coordinates through).
pub struct Opened {
    pub store: Arc<dyn Store>,
    pub postgres: Option<sqlx::PgPool>,
}

/// Open the configured store (creating or migrating its schema).
pub async fn open(storage: &crate::config::Storage) -> Result<Opened> {
    Ok(match storage {
        crate::config::Storage::Sqlite(path) => Opened {
            store: Arc::new(sqlite::SqliteStore::open(path).await?),
            postgres: None,
        },
        crate::config::Storage::Postgres(url) => {
            let store = postgres::PostgresStore::open(url.expose()).await?;
            Opened {
                postgres: Some(store.pool()),
                store: Arc::new(store),
            }
        }
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleMeta {
    pub sha256: Sha256Hex,
    pub name: String,
    pub version: u64,
    pub size: u64,
    /// The signed manifest bytes, re-parsed when needed.
    pub manifest: Vec<u8>,
    pub signers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRecord {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// What it said when it last connected; written by
    /// [`Store::record_presence`], never by [`Store::upsert_agent`].
    pub inventory: Inventory,
}

/// What the controller knows of an agent beyond its name and labels (all
/// `None` until it connects after the inventory existed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    pub first_seen: Option<Millis>,
    pub last_seen: Option<Millis>,
    pub agent_version: Option<String>,
    pub kernel: Option<String>,
    pub landlock_abi: Option<u32>,
    /// The replica holding its order stream (`Cluster::id`), if any.
    pub connected_to: Option<u64>,
    /// Serial (lowercase hex) and expiry of the certificate it last
    /// connected with.
    pub cert_serial: Option<String>,
    pub cert_not_after: Option<Millis>,
}

/// One change of an agent's presence, as [`Store::record_presence`] writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceUpdate {
    /// Its order stream opened on replica `replica` at `at`.
    Connected {
        name: String,
        at: Millis,
        replica: u64,
        agent_version: String,
        kernel: String,
        landlock_abi: Option<u32>,
        cert_serial: String,
        cert_not_after: Option<Millis>,
    },
    /// Its order stream on `replica` closed at `at`. Changes nothing if the
    /// agent is connected elsewhere by now.
    Gone {
        name: String,
        at: Millis,
        replica: u64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct RolloutRecord {
    pub id: RolloutId,
    pub bundle_sha256: Sha256Hex,
    pub state: RolloutState,
    pub phase: WavePhase,
    pub current_wave: u32,
    pub plan: Plan,
    pub bake_until: Option<Millis>,
    pub halt_reason: Option<String>,
    /// Failures already seen when an operator last resumed: only failures
    /// beyond these count against `max_failures`.
    pub ack_failures: u32,
    /// Alerting reports already seen when an operator last resumed.
    pub ack_alerts: u32,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// Where one host stands in one rollout.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Order recorded (and sent when the agent is connected); no result yet.
    Dispatched,
    /// No result within the deadline.
    TimedOut,
    Reported(Box<RunReport>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct DispatchRecord {
    pub rollout_id: RolloutId,
    pub host: String,
    pub wave: u32,
    pub dispatched_at: Millis,
    pub outcome: Outcome,
    /// Its report came after the deadline: it counted as a timeout then,
    /// and still does (an operator's resume acknowledged that count; the
    /// late report must not take it back, or a later alarm would be
    /// absorbed by it).
    pub reported_late: bool,
}

/// A run order still owed to a host (its rollout is running and it has not
/// reported).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingOrder {
    pub rollout_id: RolloutId,
    pub bundle_sha256: Sha256Hex,
    pub bundle_size: u64,
    /// Owed as `Order::Preview`, not `Order::Run`.
    pub preview: bool,
    /// Owed as `Order::Run` with `retry` (a rollout made by `rollout retry`).
    pub retry: bool,
}

/// A run report to store.
#[derive(Debug, Clone, PartialEq)]
pub struct NewReport {
    pub rollout_id: RolloutId,
    pub host: String,
    pub report: RunReport,
    pub at: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportOutcome {
    Stored,
    /// Already stored (the agent re-sent it after a reconnect): ignored.
    Duplicate,
    /// No dispatch of this rollout to this host exists.
    NotDispatched,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorLogEntry {
    pub seq: i64,
    pub at: Millis,
    pub actor: String,
    pub action: String,
    pub detail: String,
    pub prev_hash: String,
    pub hash: String,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn upsert_agent(&self, agent: &AgentRecord) -> Result<()>;
    async fn list_agents(&self) -> Result<Vec<AgentRecord>>;
    /// Apply presence changes in order, in one transaction. An agent that
    /// is not registered is skipped (it was removed meanwhile).
    async fn record_presence(&self, updates: &[PresenceUpdate]) -> Result<()>;
    /// Deregister `name`; returns its record, or `None` if it was not
    /// registered. Its dispatches and reports stay (they are history).
    async fn remove_agent(&self, name: &str) -> Result<Option<AgentRecord>>;

    async fn put_bundle(&self, meta: &BundleMeta, bytes: &[u8]) -> Result<()>;
    async fn bundle_meta(&self, sha: &Sha256Hex) -> Result<Option<BundleMeta>>;
    async fn bundle_bytes(&self, sha: &Sha256Hex) -> Result<Option<Vec<u8>>>;

    async fn create_rollout(&self, r: &RolloutRecord) -> Result<()>;
    async fn rollout(&self, id: &RolloutId) -> Result<Option<RolloutRecord>>;
    async fn rollouts(&self) -> Result<Vec<RolloutRecord>>;
    async fn rollouts_in_state(&self, state: RolloutState) -> Result<Vec<RolloutRecord>>;
    /// Move a *running* rollout's wave/phase; false if it is not running.
    async fn update_progress(
        &self,
        id: &RolloutId,
        phase: WavePhase,
        wave: u32,
        bake_until: Option<Millis>,
    ) -> Result<bool>;
    /// Halt a running rollout; false if it was not running.
    async fn halt(&self, id: &RolloutId, reason: &str) -> Result<bool>;
    /// Resume a halted rollout, acknowledging the failures and alerts seen
    /// so far; false if it was not halted.
    async fn resume(&self, id: &RolloutId, ack_failures: u32, ack_alerts: u32) -> Result<bool>;
    async fn complete(&self, id: &RolloutId) -> Result<bool>;

    /// Durably record dispatches of `hosts` in `wave`, in one transaction,
    /// only while the rollout is running. Hosts already dispatched are left
    /// as they are. Returns false (and records nothing) if not running.
    async fn record_dispatches(
        &self,
        id: &RolloutId,
        wave: u32,
        hosts: &[String],
        at: Millis,
    ) -> Result<bool>;
    async fn dispatches(&self, id: &RolloutId) -> Result<Vec<DispatchRecord>>;
    /// Store a batch of run reports in one transaction; one outcome per item.
    async fn record_reports(&self, items: &[NewReport]) -> Result<Vec<ReportOutcome>>;
    async fn record_report(
        &self,
        id: &RolloutId,
        host: &str,
        report: &RunReport,
        at: Millis,
    ) -> Result<ReportOutcome> {
        let item = NewReport {
            rollout_id: id.clone(),
            host: host.to_string(),
            report: report.clone(),
            at,
        };
        let mut out = self.record_reports(std::slice::from_ref(&item)).await?;
        out.pop()
            .ok_or_else(|| StoreError::Corrupt("no outcome for a stored report".into()))
    }
    async fn mark_timed_out(&self, id: &RolloutId, hosts: &[String]) -> Result<()>;
    async fn pending_orders(&self, host: &str) -> Result<Vec<PendingOrder>>;

    async fn kill_state(&self) -> Result<KillState>;
    async fn add_kill(&self, scope: &KillScope, order: &KillOrder) -> Result<KillState>;
    /// Lift one kill order, or all of them when `scope` is `None`.
    async fn lift_kill(&self, scope: Option<&KillScope>) -> Result<KillState>;

    /// Append to the hash-chained operator log (table `audit`, its name from
    /// before; renaming a table needs a migration and buys nothing).
    async fn append_operator_log(
        &self,
        actor: &str,
        action: &str,
        detail: &serde_json::Value,
    ) -> Result<OperatorLogEntry>;
    async fn operator_log_entries(&self) -> Result<Vec<OperatorLogEntry>>;

    /// Record revoked certificate serials (lowercase hex) of `name`; a
    /// serial already recorded is kept as it is.
    async fn add_revocations(&self, name: &str, serials: &[String]) -> Result<()>;
    /// Every revoked serial recorded in the database.
    async fn revoked_serials(&self) -> Result<Vec<String>>;

    /// Record a one-time enrollment token for `host` by its hash
    /// ([`crate::enroll::token_hash`]); the token itself is never stored.
    async fn create_enrollment_token(
        &self,
        hash: &str,
        host: &str,
        created_at: Millis,
        expires_at: Millis,
    ) -> Result<()>;
    /// Use the token with this hash made for `host`: one conditional
    /// update, so it succeeds once, and only before it expires. False if
    /// unknown, used, expired or for another host (deliberately not told
    /// apart).
    async fn consume_enrollment_token(&self, hash: &str, host: &str, now: Millis) -> Result<bool>;
    /// Record a certificate issued to agent `name` (serial lowercase hex).
    async fn record_issued_cert(&self, serial: &str, name: &str, not_after: Millis) -> Result<()>;
    /// The serials of every certificate recorded as issued to `name`.
    async fn issued_serials(&self, name: &str) -> Result<Vec<String>>;
}

/// The hash of an operator log entry: SHA-256 over the previous hash and the
/// entry's fields, one per line, so editing, removing or reordering any
/// entry breaks every later hash.
pub fn operator_log_hash(
    prev_hash: &str,
    seq: i64,
    at: Millis,
    actor: &str,
    action: &str,
    detail: &str,
) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for part in [
        prev_hash,
        &seq.to_string(),
        &at.to_string(),
        actor,
        action,
        detail,
    ] {
        h.update(part.as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

/// The all-zero hash the first entry chains to.
pub const AUDIT_GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Check the operator log's chain; returns the sequence number of the first bad entry.
pub fn verify_operator_log(entries: &[OperatorLogEntry]) -> std::result::Result<(), i64> {
    let mut prev = AUDIT_GENESIS.to_string();
    for (expected_seq, e) in (1..).zip(entries) {
        let h = operator_log_hash(&prev, e.seq, e.at, &e.actor, &e.action, &e.detail);
        if e.seq != expected_seq || e.prev_hash != prev || e.hash != h {
            return Err(e.seq);
        }
        prev = h;
    }
    Ok(())
}
