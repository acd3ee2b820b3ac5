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
    KillOrder, KillScope, KillState, RolloutId, RolloutState, Sha256Hex, WavePhase,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::Row;

use super::decode::{self, corrupt, json, phase_str, scope_key};
use super::*;

/// `migrations/sqlite/`, embedded at build time.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

pub struct SqliteStore {
    pool: SqlitePool,
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
        // Before sqlx's migrator the schema version was this table's
        // maximum; only version 1 was ever released, and it is exactly
        // `0001_initial.sql`, which adopts it. Anything newer came from a
        // controller this one does not know.
        let legacy: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'",
        )
        .fetch_optional(&self.pool)
        .await?;
        if legacy.is_some() {
            let version: Option<i64> =
                sqlx::query_scalar("SELECT MAX(version) FROM schema_version")
                    .fetch_one(&self.pool)
                    .await?;
            if version.unwrap_or(0) > 1 {
                return Err(corrupt(format!(
                    "database schema version {} is newer than this controller; refusing to use it",
                    version.unwrap_or(0)
                )));
            }
        }
        MIGRATOR.run(&self.pool).await?;
        Ok(())
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
        sqlx::query(
            "INSERT INTO agents (name, labels, updated_at) VALUES (?, ?, ?)
             ON CONFLICT(name) DO UPDATE SET labels = excluded.labels, updated_at = excluded.updated_at",
        )
        .bind(&agent.name)
        .bind(json(&agent.labels)?)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_agents(&self) -> Result<Vec<AgentRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {} FROM agents ORDER BY name",
            decode::AGENT_COLUMNS
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode::agent).collect()
    }

    async fn record_presence(&self, updates: &[PresenceUpdate]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for u in updates {
            match u {
                PresenceUpdate::Connected {
                    name,
                    at,
                    replica,
                    agent_version,
                    kernel,
                    landlock_abi,
                    cert_serial,
                    cert_not_after,
                } => {
                    sqlx::query(
                        "UPDATE agents SET first_seen = COALESCE(first_seen, ?), last_seen = ?,
                         agent_version = ?, kernel = ?, landlock_abi = ?, connected_to = ?,
                         cert_serial = ?, cert_not_after = ? WHERE name = ?",
                    )
                    .bind(at)
                    .bind(at)
                    .bind(agent_version)
                    .bind(kernel)
                    .bind(landlock_abi.map(i64::from))
                    .bind(*replica as i64)
                    .bind(cert_serial)
                    .bind(cert_not_after)
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
                }
                PresenceUpdate::Gone { name, at, replica } => {
                    sqlx::query(
                        "UPDATE agents SET last_seen = ?, connected_to = NULL
                         WHERE name = ? AND connected_to = ?",
                    )
                    .bind(at)
                    .bind(name)
                    .bind(*replica as i64)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn remove_agent(&self, name: &str) -> Result<Option<AgentRecord>> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "SELECT {} FROM agents WHERE name = ?",
            decode::AGENT_COLUMNS
        ))
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let record = decode::agent(&row)?;
        sqlx::query("DELETE FROM agents WHERE name = ?")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(record))
    }

    async fn put_bundle(&self, meta: &BundleMeta, bytes: &[u8]) -> Result<()> {
        sqlx::query(
            "INSERT INTO bundles (sha256, name, version, size, manifest, signers, bytes, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(meta.sha256.as_str())
        .bind(&meta.name)
        .bind(meta.version as i64)
        .bind(meta.size as i64)
        .bind(&meta.manifest)
        .bind(json(&meta.signers)?)
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
        row.as_ref().map(decode::bundle_meta).transpose()
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
                                   ack_failures, ack_alerts, created_at, updated_at, preview, retry_of)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(r.id.as_str())
        .bind(r.bundle_sha256.as_str())
        .bind(r.state.as_str())
        .bind(phase_str(r.phase))
        .bind(r.current_wave as i64)
        .bind(json(&r.plan)?)
        .bind(r.bake_until)
        .bind(&r.halt_reason)
        .bind(r.ack_failures as i64)
        .bind(r.ack_alerts as i64)
        .bind(r.created_at)
        .bind(r.updated_at)
        .bind(i64::from(r.plan.preview))
        .bind(r.plan.retry_of.as_ref().map(|id| id.as_str()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn rollout(&self, id: &RolloutId) -> Result<Option<RolloutRecord>> {
        let row = sqlx::query("SELECT * FROM rollouts WHERE id = ?")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(decode::rollout).transpose()
    }

    async fn rollouts(&self) -> Result<Vec<RolloutRecord>> {
        let rows = sqlx::query("SELECT * FROM rollouts ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(decode::rollout).collect()
    }

    async fn rollouts_in_state(&self, state: RolloutState) -> Result<Vec<RolloutRecord>> {
        let rows = sqlx::query("SELECT * FROM rollouts WHERE state = ? ORDER BY created_at, id")
            .bind(state.as_str())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(decode::rollout).collect()
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
        // IMMEDIATE: the write lock is taken before the state is read, so a
        // halt cannot commit between the check and the inserts.
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
                "INSERT INTO dispatches (rollout_id, host, wave, dispatched_at, outcome)
                 VALUES (?, ?, ?, ?, 'dispatched') ON CONFLICT DO NOTHING",
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
        rows.iter().map(decode::dispatch).collect()
    }

    async fn record_reports(&self, items: &[NewReport]) -> Result<Vec<ReportOutcome>> {
        // One transaction (one fsync) for a whole burst of reports.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            // A late report after a timeout is still recorded, so the
            // status shows what really happened, as `reported_late`: the
            // timeout keeps counting (`DispatchRecord::reported_late`).
            let done = sqlx::query(
                "UPDATE dispatches
                 SET outcome = CASE outcome WHEN 'timed_out' THEN 'reported_late' ELSE 'reported' END,
                     report = ?, reported_at = ?
                 WHERE rollout_id = ? AND host = ? AND outcome IN ('dispatched', 'timed_out')",
            )
            .bind(json(&item.report)?)
            .bind(item.at)
            .bind(item.rollout_id.as_str())
            .bind(&item.host)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 1 {
                out.push(ReportOutcome::Stored);
                continue;
            }
            let exists: Option<String> =
                sqlx::query_scalar("SELECT host FROM dispatches WHERE rollout_id = ? AND host = ?")
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
            "SELECT d.rollout_id AS rollout_id, r.bundle_sha256 AS sha256, b.size AS size, r.preview AS preview, r.retry_of AS retry_of
             FROM dispatches d JOIN rollouts r ON r.id = d.rollout_id JOIN bundles b ON b.sha256 = r.bundle_sha256
             WHERE d.host = ? AND d.outcome = 'dispatched' AND r.state = 'running'
             ORDER BY d.dispatched_at",
        )
        .bind(host)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode::pending_order).collect()
    }

    async fn kill_state(&self) -> Result<KillState> {
        let generation: Option<i64> =
            sqlx::query_scalar("SELECT value FROM meta WHERE key = 'kill_generation'")
                .fetch_optional(&self.pool)
                .await?;
        let rows = sqlx::query("SELECT scope, reason, by_name, at FROM kills ORDER BY scope")
            .fetch_all(&self.pool)
            .await?;
        decode::kill_state(generation, &rows)
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
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let last = sqlx::query("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| Ok::<_, StoreError>((r.try_get("seq")?, r.try_get("hash")?)))
            .transpose()?;
        let e = decode::next_operator_log_entry(last, actor, action, json(detail)?);
        sqlx::query("INSERT INTO audit (seq, at, actor, action, detail, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?)")
            .bind(e.seq)
            .bind(e.at)
            .bind(&e.actor)
            .bind(&e.action)
            .bind(&e.detail)
            .bind(&e.prev_hash)
            .bind(&e.hash)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(e)
    }

    async fn operator_log_entries(&self) -> Result<Vec<OperatorLogEntry>> {
        let rows = sqlx::query("SELECT * FROM audit ORDER BY seq")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(decode::operator_log_entry).collect()
    }

    async fn add_revocations(&self, name: &str, serials: &[String]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for serial in serials {
            sqlx::query(
                "INSERT INTO revoked (serial, name, at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
            )
            .bind(serial)
            .bind(name)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn revoked_serials(&self) -> Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT serial FROM revoked ORDER BY serial")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    async fn create_enrollment_token(
        &self,
        hash: &str,
        host: &str,
        created_at: Millis,
        expires_at: Millis,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO enrollment_tokens (hash, host, created_at, expires_at) VALUES (?, ?, ?, ?)",
        )
        .bind(hash)
        .bind(host)
        .bind(created_at)
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn consume_enrollment_token(&self, hash: &str, host: &str, now: Millis) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE enrollment_tokens SET used_at = ? \
             WHERE hash = ? AND host = ? AND used_at IS NULL AND expires_at > ?",
        )
        .bind(now)
        .bind(hash)
        .bind(host)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn record_issued_cert(&self, serial: &str, name: &str, not_after: Millis) -> Result<()> {
        sqlx::query(
            "INSERT INTO issued_certs (serial, name, not_after, issued_at) VALUES (?, ?, ?, ?) \
             ON CONFLICT DO NOTHING",
        )
        .bind(serial)
        .bind(name)
        .bind(not_after)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn issued_serials(&self, name: &str) -> Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT serial FROM issued_certs WHERE name = ? ORDER BY serial")
                .bind(name)
                .fetch_all(&self.pool)
                .await?,
        )
    }
}

#[cfg(test)]
mod tests {
    //! The store's contract for both backends is `tests/tests/store_contract.rs`;
    //! here only what is SQLite's own: adopting a database from before sqlx's
    //! migrator.
    use super::*;

    async fn legacy_db(path: &Path, version: i64) {
        let options = SqliteConnectOptions::from_str("sqlite://")
            .unwrap()
            .filename(path)
            .create_if_missing(true);
        let pool = SqlitePool::connect_with(options).await.unwrap();
        let schema = include_str!("../../migrations/sqlite/0001_initial.sql");
        sqlx::raw_sql(schema).execute(&pool).await.unwrap();
        sqlx::raw_sql(
            "CREATE TABLE schema_version (version INTEGER NOT NULL);
             INSERT INTO kills (scope, reason, by_name, at) VALUES ('all', 'stop', 'admin', 't');",
        )
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query("INSERT INTO schema_version (version) VALUES (?)")
            .bind(version)
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    }

    #[tokio::test]
    async fn a_database_from_before_the_migrator_is_adopted_with_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        legacy_db(&path, 1).await;
        let store = SqliteStore::open(&path).await.unwrap();
        assert!(store.kill_state().await.unwrap().all.is_some());
        drop(store);
        // And again, now that sqlx's table records the migration.
        let store = SqliteStore::open(&path).await.unwrap();
        assert!(store.kill_state().await.unwrap().all.is_some());
    }

    #[tokio::test]
    async fn a_database_from_a_newer_controller_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        legacy_db(&path, 2).await;
        let err = SqliteStore::open(&path).await.err().expect("refused");
        assert!(err.to_string().contains("newer"), "{err}");

        // A migration this build does not know, recorded by sqlx.
        let path = dir.path().join("d.db");
        drop(SqliteStore::open(&path).await.unwrap());
        let pool = SqlitePool::connect_with(SqliteConnectOptions::new().filename(&path))
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
             VALUES (9999, 'from the future', TRUE, X'00', 0)",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
        let err = SqliteStore::open(&path).await.err().expect("refused");
        assert!(matches!(err, StoreError::Migrate(_)), "{err}");
    }
}
