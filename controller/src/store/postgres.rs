//! PostgreSQL implementation of [`Store`] (sqlx), for controllers in high
//! availability: several replicas share one database.
//!
//! The SQL is `sqlite.rs`'s in PostgreSQL's dialect; what a row means is
//! decoded once, in `decode.rs`. Where SQLite serializes every writer
//! (`BEGIN IMMEDIATE`), PostgreSQL runs transactions at READ COMMITTED
//! side by side, so each check-then-write names its lock: the rollout row
//! (`FOR UPDATE`) for dispatches, an advisory lock for the operator log's
//! chain. Single-statement conditional updates (halt, resume, a report)
//! need none: PostgreSQL re-checks their `WHERE` after a concurrent commit.
//! Text is ordered `COLLATE "C"` (bytewise, as SQLite does) whatever the
//! database's locale, so listings come out the same on both backends.

use std::time::Duration;

use async_trait::async_trait;
use rollguard_shared::protocol::{
    KillOrder, KillScope, KillState, RolloutId, RolloutState, Sha256Hex, WavePhase,
};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::Row;

use super::decode::{self, json, phase_str, scope_key};
use super::*;

/// `migrations/postgres/`, embedded at build time. sqlx's migrator holds
/// an advisory lock while it runs, so replicas starting together apply
/// each migration once.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// The advisory lock key that serializes operator log appends ("rgoplog").
const OPERATOR_LOG_LOCK: i64 = 0x0072_676f_706c_6f67;

pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connect (a `postgres://` URL, libpq's syntax) and migrate.
    pub async fn open(url: &str) -> Result<Self> {
        let options: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            // A database that cannot hand out a connection in this time is
            // an error the caller reports, not a hang.
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(PostgresStore { pool })
    }

    /// The connection pool (shared with `crate::cluster`).
    pub fn pool(&self) -> PgPool {
        self.pool.clone()
    }

    async fn bump_generation(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>) -> Result<()> {
        sqlx::query(
            "INSERT INTO meta (key, value) VALUES ('kill_generation', 1)
             ON CONFLICT (key) DO UPDATE SET value = meta.value + 1",
        )
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn upsert_agent(&self, agent: &AgentRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO agents (name, labels, updated_at) VALUES ($1, $2, $3)
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
            "SELECT {} FROM agents ORDER BY name COLLATE \"C\"",
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
                        "UPDATE agents SET first_seen = COALESCE(first_seen, $1), last_seen = $2,
                         agent_version = $3, kernel = $4, landlock_abi = $5, connected_to = $6,
                         cert_serial = $7, cert_not_after = $8 WHERE name = $9",
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
                        "UPDATE agents SET last_seen = $1, connected_to = NULL
                         WHERE name = $2 AND connected_to = $3",
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
            "SELECT {} FROM agents WHERE name = $1",
            decode::AGENT_COLUMNS
        ))
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let record = decode::agent(&row)?;
        sqlx::query("DELETE FROM agents WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(record))
    }

    async fn put_bundle(&self, meta: &BundleMeta, bytes: &[u8]) -> Result<()> {
        sqlx::query(
            "INSERT INTO bundles (sha256, name, version, size, manifest, signers, bytes, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
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
            "SELECT sha256, name, version, size, manifest, signers FROM bundles WHERE sha256 = $1",
        )
        .bind(sha.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(decode::bundle_meta).transpose()
    }

    async fn bundle_bytes(&self, sha: &Sha256Hex) -> Result<Option<Vec<u8>>> {
        Ok(
            sqlx::query_scalar("SELECT bytes FROM bundles WHERE sha256 = $1")
                .bind(sha.as_str())
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn create_rollout(&self, r: &RolloutRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO rollouts (id, bundle_sha256, state, phase, current_wave, plan, bake_until, halt_reason,
                                   ack_failures, ack_alerts, created_at, updated_at, preview, retry_of)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
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
        let row = sqlx::query("SELECT * FROM rollouts WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(decode::rollout).transpose()
    }

    async fn rollouts(&self) -> Result<Vec<RolloutRecord>> {
        let rows = sqlx::query("SELECT * FROM rollouts ORDER BY created_at, id COLLATE \"C\"")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(decode::rollout).collect()
    }

    async fn rollouts_in_state(&self, state: RolloutState) -> Result<Vec<RolloutRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM rollouts WHERE state = $1 ORDER BY created_at, id COLLATE \"C\"",
        )
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
            "UPDATE rollouts SET phase = $1, current_wave = $2, bake_until = $3, updated_at = $4
             WHERE id = $5 AND state = 'running'",
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
            "UPDATE rollouts SET state = 'halted', halt_reason = $1, updated_at = $2 WHERE id = $3 AND state = 'running'",
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
            "UPDATE rollouts SET state = 'running', halt_reason = NULL, ack_failures = $1, ack_alerts = $2, updated_at = $3
             WHERE id = $4 AND state = 'halted'",
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
            "UPDATE rollouts SET state = 'completed', bake_until = NULL, updated_at = $1 WHERE id = $2 AND state = 'running'",
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
        // FOR UPDATE: the rollout's row stays locked until the inserts
        // commit, so a halt (an UPDATE of that row, from any replica) waits
        // and cannot commit between the check and the inserts.
        let mut tx = self.pool.begin().await?;
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM rollouts WHERE id = $1 FOR UPDATE")
                .bind(id.as_str())
                .fetch_optional(&mut *tx)
                .await?;
        if state.as_deref() != Some("running") {
            return Ok(false);
        }
        for host in hosts {
            sqlx::query(
                "INSERT INTO dispatches (rollout_id, host, wave, dispatched_at, outcome)
                 VALUES ($1, $2, $3, $4, 'dispatched') ON CONFLICT DO NOTHING",
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
            "SELECT * FROM dispatches WHERE rollout_id = $1 ORDER BY wave, dispatched_at, host COLLATE \"C\"",
        )
        .bind(id.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode::dispatch).collect()
    }

    async fn record_reports(&self, items: &[NewReport]) -> Result<Vec<ReportOutcome>> {
        // One transaction (one WAL flush) for a whole burst of reports. The
        // conditional UPDATE is re-checked against a concurrent one's commit,
        // so a report racing itself through two replicas is stored once.
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            // A late report after a timeout is still recorded, so the
            // status shows what really happened, as `reported_late`: the
            // timeout keeps counting (`DispatchRecord::reported_late`).
            let done = sqlx::query(
                "UPDATE dispatches
                 SET outcome = CASE outcome WHEN 'timed_out' THEN 'reported_late' ELSE 'reported' END,
                     report = $1, reported_at = $2
                 WHERE rollout_id = $3 AND host = $4 AND outcome IN ('dispatched', 'timed_out')",
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
            let exists: Option<String> = sqlx::query_scalar(
                "SELECT host FROM dispatches WHERE rollout_id = $1 AND host = $2",
            )
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
        let mut tx = self.pool.begin().await?;
        for host in hosts {
            sqlx::query(
                "UPDATE dispatches SET outcome = 'timed_out' WHERE rollout_id = $1 AND host = $2 AND outcome = 'dispatched'",
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
             WHERE d.host = $1 AND d.outcome = 'dispatched' AND r.state = 'running'
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
        let rows = sqlx::query(
            "SELECT scope, reason, by_name, at FROM kills ORDER BY scope COLLATE \"C\"",
        )
        .fetch_all(&self.pool)
        .await?;
        decode::kill_state(generation, &rows)
    }

    async fn add_kill(&self, scope: &KillScope, order: &KillOrder) -> Result<KillState> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO kills (scope, reason, by_name, at) VALUES ($1, $2, $3, $4)
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
        let mut tx = self.pool.begin().await?;
        match scope {
            None => sqlx::query("DELETE FROM kills").execute(&mut *tx).await?,
            Some(s) => {
                sqlx::query("DELETE FROM kills WHERE scope = $1")
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
        let mut tx = self.pool.begin().await?;
        // Replicas append concurrently: one chain, so one writer at a time
        // (the lock is released when the transaction ends).
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(OPERATOR_LOG_LOCK)
            .execute(&mut *tx)
            .await?;
        let last = sqlx::query("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| Ok::<_, StoreError>((r.try_get("seq")?, r.try_get("hash")?)))
            .transpose()?;
        let e = decode::next_operator_log_entry(last, actor, action, json(detail)?);
        sqlx::query("INSERT INTO audit (seq, at, actor, action, detail, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7)")
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
                "INSERT INTO revoked (serial, name, at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
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
            sqlx::query_scalar("SELECT serial FROM revoked ORDER BY serial COLLATE \"C\"")
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
            "INSERT INTO enrollment_tokens (hash, host, created_at, expires_at) VALUES ($1, $2, $3, $4)",
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
            "UPDATE enrollment_tokens SET used_at = $1 \
             WHERE hash = $2 AND host = $3 AND used_at IS NULL AND expires_at > $4",
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
            "INSERT INTO issued_certs (serial, name, not_after, issued_at) VALUES ($1, $2, $3, $4) \
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
        Ok(sqlx::query_scalar(
            "SELECT serial FROM issued_certs WHERE name = $1 ORDER BY serial COLLATE \"C\"",
        )
        .bind(name)
        .fetch_all(&self.pool)
        .await?)
    }
}
