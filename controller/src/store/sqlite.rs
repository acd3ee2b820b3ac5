//! SQLite implementation of [`Store`] (sqlx, WAL journal, `synchronous =
//! FULL` so a commit survives power loss, not only a crash).
//!
//! Queries use the runtime-checked `sqlx::query` API, not the `query!`
//! macros, so building needs no database.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use rollguard_shared::protocol::{
    KillOrder, KillScope, KillState, RolloutId, RolloutKill, RolloutState, Sha256Hex, WavePhase,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::Row;

use super::*;

/// Schema migrations, applied in order; the index + 1 is the schema version.
/// Never edit a released entry: append a new one.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE agents (
    name TEXT PRIMARY KEY,
    labels TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE bundles (
    sha256 TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    size INTEGER NOT NULL,
    manifest BLOB NOT NULL,
    signers TEXT NOT NULL,
    bytes BLOB NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE rollouts (
    id TEXT PRIMARY KEY,
    bundle_sha256 TEXT NOT NULL REFERENCES bundles(sha256),
    state TEXT NOT NULL,
    phase TEXT NOT NULL,
    current_wave INTEGER NOT NULL,
    plan TEXT NOT NULL,
    bake_until INTEGER,
    halt_reason TEXT,
    ack_failures INTEGER NOT NULL DEFAULT 0,
    ack_alerts INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE dispatches (
    rollout_id TEXT NOT NULL REFERENCES rollouts(id),
    host TEXT NOT NULL,
    wave INTEGER NOT NULL,
    dispatched_at INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    report TEXT,
    reported_at INTEGER,
    PRIMARY KEY (rollout_id, host)
);
CREATE INDEX dispatches_by_host ON dispatches(host, outcome);
CREATE TABLE kills (
    scope TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    by_name TEXT NOT NULL,
    at TEXT NOT NULL
);
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
"#];

pub struct SqliteStore {
    pool: SqlitePool,
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

fn phase_str(p: WavePhase) -> &'static str {
    match p {
        WavePhase::Dispatching => "dispatching",
        WavePhase::Awaiting => "awaiting",
        WavePhase::Baking => "baking",
    }
}

fn parse_phase(s: &str) -> Result<WavePhase> {
    Ok(match s {
        "dispatching" => WavePhase::Dispatching,
        "awaiting" => WavePhase::Awaiting,
        "baking" => WavePhase::Baking,
        other => return Err(corrupt(format!("phase {other:?}"))),
    })
}

fn scope_key(scope: &KillScope) -> String {
    match scope {
        KillScope::All => "all".to_string(),
        KillScope::Rollout(id) => format!("rollout:{id}"),
    }
}

impl SqliteStore {
    pub async fn open(path: &Path) -> Result<Self> {
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        let store = SqliteStore { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<()> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            .execute(&mut *tx)
            .await?;
        let current: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM schema_version")
            .fetch_one(&mut *tx)
            .await?;
        let current = current.unwrap_or(0) as usize;
        if current > MIGRATIONS.len() {
            return Err(corrupt(format!(
                "database schema version {current} is newer than this controller ({}); refusing to use it",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
            sqlx::raw_sql(sql).execute(&mut *tx).await?;
            sqlx::query("INSERT INTO schema_version (version) VALUES (?)")
                .bind(i as i64 + 1)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    fn rollout_from_row(row: &SqliteRow) -> Result<RolloutRecord> {
        let id: String = row.try_get("id")?;
        let sha: String = row.try_get("bundle_sha256")?;
        let state: String = row.try_get("state")?;
        let plan: String = row.try_get("plan")?;
        Ok(RolloutRecord {
            id: RolloutId::parse(&id).map_err(corrupt)?,
            bundle_sha256: Sha256Hex::parse(&sha).map_err(corrupt)?,
            state: RolloutState::parse(&state)
                .ok_or_else(|| corrupt(format!("state {state:?}")))?,
            phase: parse_phase(&row.try_get::<String, _>("phase")?)?,
            current_wave: row.try_get::<i64, _>("current_wave")? as u32,
            plan: serde_json::from_str(&plan).map_err(corrupt)?,
            bake_until: row.try_get("bake_until")?,
            halt_reason: row.try_get("halt_reason")?,
            ack_failures: row.try_get::<i64, _>("ack_failures")? as u32,
            ack_alerts: row.try_get::<i64, _>("ack_alerts")? as u32,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
        })
    }

    fn dispatch_from_row(row: &SqliteRow) -> Result<DispatchRecord> {
        let id: String = row.try_get("rollout_id")?;
        let outcome: String = row.try_get("outcome")?;
        let outcome = match outcome.as_str() {
            "dispatched" => Outcome::Dispatched,
            "timed_out" => Outcome::TimedOut,
            "reported" => {
                let text: Option<String> = row.try_get("report")?;
                let text = text.ok_or_else(|| corrupt("reported dispatch without report"))?;
                Outcome::Reported(Box::new(serde_json::from_str(&text).map_err(corrupt)?))
            }
            other => return Err(corrupt(format!("outcome {other:?}"))),
        };
        Ok(DispatchRecord {
            rollout_id: RolloutId::parse(&id).map_err(corrupt)?,
            host: row.try_get("host")?,
            wave: row.try_get::<i64, _>("wave")? as u32,
            dispatched_at: row.try_get("dispatched_at")?,
            outcome,
        })
    }

    async fn bump_generation(tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>) -> Result<()> {
        sqlx::query(
            "INSERT INTO meta (key, value) VALUES ('kill_generation', 1)
             ON CONFLICT(key) DO UPDATE SET value = value + 1",
        )
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn upsert_agent(&self, agent: &AgentRecord) -> Result<()> {
        let labels = serde_json::to_string(&agent.labels).map_err(corrupt)?;
        sqlx::query(
            "INSERT INTO agents (name, labels, updated_at) VALUES (?, ?, ?)
             ON CONFLICT(name) DO UPDATE SET labels = excluded.labels, updated_at = excluded.updated_at",
        )
        .bind(&agent.name)
        .bind(labels)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_agents(&self) -> Result<Vec<AgentRecord>> {
        let rows = sqlx::query("SELECT name, labels FROM agents ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let labels: String = r.try_get("labels")?;
                Ok(AgentRecord {
                    name: r.try_get("name")?,
                    labels: serde_json::from_str(&labels).map_err(corrupt)?,
                })
            })
            .collect()
    }

    async fn put_bundle(&self, meta: &BundleMeta, bytes: &[u8]) -> Result<()> {
        sqlx::query(
            "INSERT OR IGNORE INTO bundles (sha256, name, version, size, manifest, signers, bytes, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(meta.sha256.as_str())
        .bind(&meta.name)
        .bind(meta.version as i64)
        .bind(meta.size as i64)
        .bind(&meta.manifest)
        .bind(serde_json::to_string(&meta.signers).map_err(corrupt)?)
        .bind(bytes)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn bundle_meta(&self, sha: &Sha256Hex) -> Result<Option<BundleMeta>> {
        let row = sqlx::query(
            "SELECT sha256, name, version, size, manifest, signers FROM bundles WHERE sha256 = ?",
        )
        .bind(sha.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            let signers: String = r.try_get("signers")?;
            Ok(BundleMeta {
                sha256: sha.clone(),
                name: r.try_get("name")?,
                version: r.try_get::<i64, _>("version")? as u64,
                size: r.try_get::<i64, _>("size")? as u64,
                manifest: r.try_get("manifest")?,
                signers: serde_json::from_str(&signers).map_err(corrupt)?,
            })
        })
        .transpose()
    }

    async fn bundle_bytes(&self, sha: &Sha256Hex) -> Result<Option<Vec<u8>>> {
        Ok(
            sqlx::query_scalar("SELECT bytes FROM bundles WHERE sha256 = ?")
                .bind(sha.as_str())
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn create_rollout(&self, r: &RolloutRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO rollouts (id, bundle_sha256, state, phase, current_wave, plan, bake_until, halt_reason,
                                   ack_failures, ack_alerts, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(r.id.as_str())
        .bind(r.bundle_sha256.as_str())
        .bind(r.state.as_str())
        .bind(phase_str(r.phase))
        .bind(r.current_wave as i64)
        .bind(serde_json::to_string(&r.plan).map_err(corrupt)?)
        .bind(r.bake_until)
        .bind(&r.halt_reason)
        .bind(r.ack_failures as i64)
        .bind(r.ack_alerts as i64)
        .bind(r.created_at)
        .bind(r.updated_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn rollout(&self, id: &RolloutId) -> Result<Option<RolloutRecord>> {
        let row = sqlx::query("SELECT * FROM rollouts WHERE id = ?")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(Self::rollout_from_row).transpose()
    }

    async fn rollouts(&self) -> Result<Vec<RolloutRecord>> {
        let rows = sqlx::query("SELECT * FROM rollouts ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(Self::rollout_from_row).collect()
    }

    async fn rollouts_in_state(&self, state: RolloutState) -> Result<Vec<RolloutRecord>> {
        let rows = sqlx::query("SELECT * FROM rollouts WHERE state = ? ORDER BY created_at, id")
            .bind(state.as_str())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(Self::rollout_from_row).collect()
    }

    async fn update_progress(
        &self,
        id: &RolloutId,
        phase: WavePhase,
        wave: u32,
        bake_until: Option<Millis>,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE rollouts SET phase = ?, current_wave = ?, bake_until = ?, updated_at = ?
             WHERE id = ? AND state = 'running'",
        )
        .bind(phase_str(phase))
        .bind(wave as i64)
        .bind(bake_until)
        .bind(now_ms())
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn halt(&self, id: &RolloutId, reason: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE rollouts SET state = 'halted', halt_reason = ?, updated_at = ? WHERE id = ? AND state = 'running'",
        )
        .bind(reason)
        .bind(now_ms())
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn resume(&self, id: &RolloutId, ack_failures: u32, ack_alerts: u32) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE rollouts SET state = 'running', halt_reason = NULL, ack_failures = ?, ack_alerts = ?, updated_at = ?
             WHERE id = ? AND state = 'halted'",
        )
        .bind(ack_failures as i64)
        .bind(ack_alerts as i64)
        .bind(now_ms())
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn complete(&self, id: &RolloutId) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE rollouts SET state = 'completed', bake_until = NULL, updated_at = ? WHERE id = ? AND state = 'running'",
        )
        .bind(now_ms())
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn record_dispatches(
        &self,
        id: &RolloutId,
        wave: u32,
        hosts: &[String],
        at: Millis,
    ) -> Result<bool> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM rollouts WHERE id = ?")
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if state.as_deref() != Some("running") {
            return Ok(false);
        }
        for host in hosts {
            sqlx::query(
                "INSERT OR IGNORE INTO dispatches (rollout_id, host, wave, dispatched_at, outcome)
                 VALUES (?, ?, ?, ?, 'dispatched')",
            )
            .bind(id.as_str())
            .bind(host)
            .bind(wave as i64)
            .bind(at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn dispatches(&self, id: &RolloutId) -> Result<Vec<DispatchRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM dispatches WHERE rollout_id = ? ORDER BY wave, dispatched_at, host",
        )
        .bind(id.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(Self::dispatch_from_row).collect()
    }

    async fn record_reports(&self, items: &[NewReport]) -> Result<Vec<ReportOutcome>> {
        // One transaction (one fsync) for a whole burst of reports.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let text = serde_json::to_string(&item.report).map_err(corrupt)?;
            // A late report after a timeout is still recorded (the timeout
            // has already counted), so the status shows what really happened.
            let done = sqlx::query(
                "UPDATE dispatches SET outcome = 'reported', report = ?, reported_at = ?
                 WHERE rollout_id = ? AND host = ? AND outcome != 'reported'",
            )
            .bind(text)
            .bind(item.at)
            .bind(item.rollout_id.as_str())
            .bind(&item.host)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 1 {
                out.push(ReportOutcome::Stored);
                continue;
            }
            let exists: Option<i64> =
                sqlx::query_scalar("SELECT 1 FROM dispatches WHERE rollout_id = ? AND host = ?")
                    .bind(item.rollout_id.as_str())
                    .bind(&item.host)
                    .fetch_optional(&mut *tx)
                    .await?;
            out.push(if exists.is_some() {
                ReportOutcome::Duplicate
            } else {
                ReportOutcome::NotDispatched
            });
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn mark_timed_out(&self, id: &RolloutId, hosts: &[String]) -> Result<()> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for host in hosts {
            sqlx::query(
                "UPDATE dispatches SET outcome = 'timed_out' WHERE rollout_id = ? AND host = ? AND outcome = 'dispatched'",
            )
            .bind(id.as_str())
            .bind(host)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn pending_orders(&self, host: &str) -> Result<Vec<PendingOrder>> {
        let rows = sqlx::query(
            "SELECT d.rollout_id AS rollout_id, r.bundle_sha256 AS sha256, b.size AS size
             FROM dispatches d JOIN rollouts r ON r.id = d.rollout_id JOIN bundles b ON b.sha256 = r.bundle_sha256
             WHERE d.host = ? AND d.outcome = 'dispatched' AND r.state = 'running'
             ORDER BY d.dispatched_at",
        )
        .bind(host)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(PendingOrder {
                    rollout_id: RolloutId::parse(&r.try_get::<String, _>("rollout_id")?)
                        .map_err(corrupt)?,
                    bundle_sha256: Sha256Hex::parse(&r.try_get::<String, _>("sha256")?)
                        .map_err(corrupt)?,
                    bundle_size: r.try_get::<i64, _>("size")? as u64,
                })
            })
            .collect()
    }

    async fn kill_state(&self) -> Result<KillState> {
        let generation: Option<i64> =
            sqlx::query_scalar("SELECT value FROM meta WHERE key = 'kill_generation'")
                .fetch_optional(&self.pool)
                .await?;
        let rows = sqlx::query("SELECT scope, reason, by_name, at FROM kills ORDER BY scope")
            .fetch_all(&self.pool)
            .await?;
        let mut state = KillState {
            generation: generation.unwrap_or(0) as u64,
            all: None,
            rollouts: vec![],
        };
        for r in rows {
            let scope: String = r.try_get("scope")?;
            let order = KillOrder {
                reason: r.try_get("reason")?,
                by: r.try_get("by_name")?,
                at: r.try_get("at")?,
            };
            if scope == "all" {
                state.all = Some(order);
            } else if let Some(id) = scope.strip_prefix("rollout:") {
                state.rollouts.push(RolloutKill {
                    rollout_id: RolloutId::parse(id).map_err(corrupt)?,
                    order,
                });
            } else {
                return Err(corrupt(format!("kill scope {scope:?}")));
            }
        }
        Ok(state)
    }

    async fn add_kill(&self, scope: &KillScope, order: &KillOrder) -> Result<KillState> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query(
            "INSERT INTO kills (scope, reason, by_name, at) VALUES (?, ?, ?, ?)
             ON CONFLICT(scope) DO UPDATE SET reason = excluded.reason, by_name = excluded.by_name, at = excluded.at",
        )
        .bind(scope_key(scope))
        .bind(&order.reason)
        .bind(&order.by)
        .bind(&order.at)
        .execute(&mut *tx)
        .await?;
        Self::bump_generation(&mut tx).await?;
        tx.commit().await?;
        self.kill_state().await
    }

    async fn lift_kill(&self, scope: Option<&KillScope>) -> Result<KillState> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        match scope {
            None => sqlx::query("DELETE FROM kills").execute(&mut *tx).await?,
            Some(s) => {
                sqlx::query("DELETE FROM kills WHERE scope = ?")
                    .bind(scope_key(s))
                    .execute(&mut *tx)
                    .await?
            }
        };
        Self::bump_generation(&mut tx).await?;
        tx.commit().await?;
        self.kill_state().await
    }

    async fn append_operator_log(
        &self,
        actor: &str,
        action: &str,
        detail: &serde_json::Value,
    ) -> Result<OperatorLogEntry> {
        let detail = serde_json::to_string(detail).map_err(corrupt)?;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let last = sqlx::query("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *tx)
            .await?;
        let (prev_seq, prev_hash) = match last {
            Some(r) => (r.try_get::<i64, _>("seq")?, r.try_get::<String, _>("hash")?),
            None => (0, AUDIT_GENESIS.to_string()),
        };
        let seq = prev_seq + 1;
        let at = now_ms();
        let hash = operator_log_hash(&prev_hash, seq, at, actor, action, &detail);
        sqlx::query("INSERT INTO audit (seq, at, actor, action, detail, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?)")
            .bind(seq)
            .bind(at)
            .bind(actor)
            .bind(action)
            .bind(&detail)
            .bind(&prev_hash)
            .bind(&hash)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(OperatorLogEntry {
            seq,
            at,
            actor: actor.into(),
            action: action.into(),
            detail,
            prev_hash,
            hash,
        })
    }

    async fn operator_log_entries(&self) -> Result<Vec<OperatorLogEntry>> {
        let rows = sqlx::query("SELECT * FROM audit ORDER BY seq")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(OperatorLogEntry {
                    seq: r.try_get("seq")?,
                    at: r.try_get("at")?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    detail: r.try_get("detail")?,
                    prev_hash: r.try_get("prev_hash")?,
                    hash: r.try_get("hash")?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rollguard_shared::protocol::{BundleSummary, Plan};
    use rollguard_shared::report::{RunReport, RunStatus};

    fn plan() -> Plan {
        Plan {
            bundle: BundleSummary {
                sha256: Sha256Hex::of(b"b"),
                name: "b".into(),
                version: 1,
                size: 1,
            },
            targets: serde_json::Value::Null,
            scope: serde_json::Value::Null,
            services: serde_json::Value::Null,
            signers: vec![],
            timeout_secs: 60,
            bake_secs: 0,
            max_failures: 0,
            halt_on: Default::default(),
            waves: vec![vec!["a".into()], vec!["b".into(), "c".into()]],
            out_of_scope: 0,
            left_out: vec![],
        }
    }

    pub(crate) fn report(host: &str, status: RunStatus) -> RunReport {
        RunReport {
            exit_code: Some(0),
            denials: Some(vec![]),
            denial_count: Some(0),
            duration_ms: 1,
            ..RunReport::new(host, status)
        }
    }

    async fn setup() -> (tempfile::TempDir, SqliteStore, RolloutId) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("c.db")).await.unwrap();
        let sha = Sha256Hex::of(b"b");
        store
            .put_bundle(
                &BundleMeta {
                    sha256: sha.clone(),
                    name: "b".into(),
                    version: 1,
                    size: 1,
                    manifest: b"m".to_vec(),
                    signers: vec![],
                },
                b"b",
            )
            .await
            .unwrap();
        let id = RolloutId::parse("r-1").unwrap();
        store
            .create_rollout(&RolloutRecord {
                id: id.clone(),
                bundle_sha256: sha,
                state: RolloutState::Running,
                phase: WavePhase::Dispatching,
                current_wave: 0,
                plan: plan(),
                bake_until: None,
                halt_reason: None,
                ack_failures: 0,
                ack_alerts: 0,
                created_at: 1,
                updated_at: 1,
            })
            .await
            .unwrap();
        (dir, store, id)
    }

    #[tokio::test]
    async fn dispatch_is_refused_once_halted() {
        let (_d, store, id) = setup().await;
        assert!(store
            .record_dispatches(&id, 0, &["a".into()], 10)
            .await
            .unwrap());
        assert_eq!(store.pending_orders("a").await.unwrap().len(), 1);
        assert!(store.halt(&id, "test").await.unwrap());
        assert!(
            !store.halt(&id, "again").await.unwrap(),
            "halting twice is a no-op"
        );
        assert!(!store
            .record_dispatches(&id, 1, &["b".into()], 11)
            .await
            .unwrap());
        assert!(!store
            .update_progress(&id, WavePhase::Baking, 0, None)
            .await
            .unwrap());
        assert!(
            store.pending_orders("a").await.unwrap().is_empty(),
            "no orders for halted rollouts"
        );
        let d = store.dispatches(&id).await.unwrap();
        assert_eq!(d.len(), 1);
        assert!(store.resume(&id, 0, 0).await.unwrap());
        assert_eq!(store.rollout(&id).await.unwrap().unwrap().halt_reason, None);
    }

    #[tokio::test]
    async fn reports_are_stored_once_and_only_for_dispatched_hosts() {
        let (_d, store, id) = setup().await;
        store
            .record_dispatches(&id, 0, &["a".into()], 10)
            .await
            .unwrap();
        store
            .record_dispatches(&id, 0, &["a".into()], 99)
            .await
            .unwrap();
        assert_eq!(
            store.dispatches(&id).await.unwrap()[0].dispatched_at,
            10,
            "re-dispatch keeps the first record"
        );
        let r = report("a", RunStatus::Succeeded);
        assert_eq!(
            store.record_report(&id, "a", &r, 20).await.unwrap(),
            ReportOutcome::Stored
        );
        assert_eq!(
            store.record_report(&id, "a", &r, 21).await.unwrap(),
            ReportOutcome::Duplicate
        );
        assert_eq!(
            store.record_report(&id, "b", &r, 21).await.unwrap(),
            ReportOutcome::NotDispatched
        );
        assert!(store.pending_orders("a").await.unwrap().is_empty());
        match &store.dispatches(&id).await.unwrap()[0].outcome {
            Outcome::Reported(rep) => assert_eq!(rep.host, "a"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_batch_of_reports_gets_one_outcome_each() {
        let (_d, store, id) = setup().await;
        store
            .record_dispatches(&id, 0, &["a".into(), "b".into()], 10)
            .await
            .unwrap();
        let item = |host: &str| NewReport {
            rollout_id: id.clone(),
            host: host.into(),
            report: report(host, RunStatus::Succeeded),
            at: 20,
        };
        let out = store
            .record_reports(&[item("a"), item("zz"), item("b"), item("a")])
            .await
            .unwrap();
        assert_eq!(
            out,
            vec![
                ReportOutcome::Stored,
                ReportOutcome::NotDispatched,
                ReportOutcome::Stored,
                ReportOutcome::Duplicate
            ]
        );
    }

    #[tokio::test]
    async fn kill_state_is_durable_and_versioned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        {
            let store = SqliteStore::open(&path).await.unwrap();
            let order = KillOrder {
                reason: "stop".into(),
                by: "admin".into(),
                at: "t".into(),
            };
            let s = store.add_kill(&KillScope::All, &order).await.unwrap();
            assert_eq!(s.generation, 1);
            assert!(s.all.is_some());
            let s = store
                .add_kill(
                    &KillScope::Rollout(RolloutId::parse("r-9").unwrap()),
                    &order,
                )
                .await
                .unwrap();
            assert_eq!((s.generation, s.rollouts.len()), (2, 1));
        }
        let store = SqliteStore::open(&path).await.unwrap();
        let s = store.kill_state().await.unwrap();
        assert_eq!(s.generation, 2);
        assert!(s.all.is_some());
        let s = store.lift_kill(Some(&KillScope::All)).await.unwrap();
        assert!(s.all.is_none() && s.rollouts.len() == 1 && s.generation == 3);
        let s = store.lift_kill(None).await.unwrap();
        assert!(s.is_empty());
    }

    #[tokio::test]
    async fn operator_log_is_hash_chained() {
        let (_d, store, _) = setup().await;
        for i in 0..3 {
            store
                .append_operator_log("admin", "rollout.start", &serde_json::json!({ "i": i }))
                .await
                .unwrap();
        }
        let mut entries = store.operator_log_entries().await.unwrap();
        assert_eq!(verify_operator_log(&entries), Ok(()));
        entries[1].detail = r#"{"i":7}"#.into();
        assert_eq!(verify_operator_log(&entries), Err(2));
        let mut entries = store.operator_log_entries().await.unwrap();
        entries.remove(0);
        assert_eq!(verify_operator_log(&entries), Err(2));
    }
}
