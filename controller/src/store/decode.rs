//! Rows to records, once for both backends. The SQL differs by dialect
//! (`sqlite.rs`, `postgres.rs`); what a stored value means does not, so a
//! row is read here through [`Fields`], the four column types the schema
//! uses (`migrations/README.md`: integers are `i64` in both).
//!
//! Every stored value is parsed back into its type: a value the controller
//! could not have written is [`StoreError::Corrupt`], never a default.

use rollguard_shared::protocol::{
    KillOrder, KillScope, KillState, RolloutId, RolloutKill, RolloutState, Sha256Hex, WavePhase,
};
use sqlx::Row;

use super::*;

/// A row's columns by name, as the schema stores them.
pub(super) trait Fields {
    fn text(&self, col: &str) -> Result<String>;
    fn opt_text(&self, col: &str) -> Result<Option<String>>;
    fn int(&self, col: &str) -> Result<i64>;
    fn opt_int(&self, col: &str) -> Result<Option<i64>>;
    fn bytes(&self, col: &str) -> Result<Vec<u8>>;
}

/// One impl for any sqlx row whose backend decodes the schema's types.
impl<R> Fields for R
where
    R: Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    fn text(&self, col: &str) -> Result<String> {
        Ok(self.try_get(col)?)
    }
    fn opt_text(&self, col: &str) -> Result<Option<String>> {
        Ok(self.try_get(col)?)
    }
    fn int(&self, col: &str) -> Result<i64> {
        Ok(self.try_get(col)?)
    }
    fn opt_int(&self, col: &str) -> Result<Option<i64>> {
        Ok(self.try_get(col)?)
    }
    fn bytes(&self, col: &str) -> Result<Vec<u8>> {
        Ok(self.try_get(col)?)
    }
}

pub(super) fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

/// A stored count or wave index: never negative, never beyond `u32`.
fn count(row: &impl Fields, col: &str) -> Result<u32> {
    let v = row.int(col)?;
    u32::try_from(v).map_err(|_| corrupt(format!("{col} {v}")))
}

fn size(row: &impl Fields, col: &str) -> Result<u64> {
    let v = row.int(col)?;
    u64::try_from(v).map_err(|_| corrupt(format!("{col} {v}")))
}

pub(super) fn json<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(corrupt)
}

fn from_json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(corrupt)
}

pub(super) fn phase_str(p: WavePhase) -> &'static str {
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

/// A kill order's key in the `kills` table.
pub(super) fn scope_key(scope: &KillScope) -> String {
    match scope {
        KillScope::All => "all".to_string(),
        KillScope::Rollout(id) => format!("rollout:{id}"),
    }
}

pub(super) fn agent(row: &impl Fields) -> Result<AgentRecord> {
    Ok(AgentRecord {
        name: row.text("name")?,
        labels: from_json(&row.text("labels")?)?,
        inventory: Inventory {
            first_seen: row.opt_int("first_seen")?,
            last_seen: row.opt_int("last_seen")?,
            agent_version: row.opt_text("agent_version")?,
            kernel: row.opt_text("kernel")?,
            landlock_abi: row
                .opt_int("landlock_abi")?
                .map(|v| u32::try_from(v).map_err(corrupt))
                .transpose()?,
            // Replica ids are kept within i64 (`cluster::Cluster::replica`).
            connected_to: row
                .opt_int("connected_to")?
                .map(|v| u64::try_from(v).map_err(corrupt))
                .transpose()?,
            cert_serial: row.opt_text("cert_serial")?,
            cert_not_after: row.opt_int("cert_not_after")?,
        },
    })
}

/// The columns [`agent`] reads, for the backends' SELECTs.
pub(super) const AGENT_COLUMNS: &str = "name, labels, first_seen, last_seen, agent_version, \
     kernel, landlock_abi, connected_to, cert_serial, cert_not_after";

pub(super) fn bundle_meta(row: &impl Fields) -> Result<BundleMeta> {
    Ok(BundleMeta {
        sha256: Sha256Hex::parse(&row.text("sha256")?).map_err(corrupt)?,
        name: row.text("name")?,
        version: size(row, "version")?,
        size: size(row, "size")?,
        manifest: row.bytes("manifest")?,
        signers: from_json(&row.text("signers")?)?,
    })
}

pub(super) fn rollout(row: &impl Fields) -> Result<RolloutRecord> {
    let state = row.text("state")?;
    let plan: Plan = from_json(&row.text("plan")?)?;
    // The column and the plan say the same, or the record is not trusted:
    // a preview read as a real rollout would send real run orders.
    if flag(row, "preview")? != plan.preview {
        return Err(corrupt("the preview column and the plan disagree"));
    }
    // Likewise for retries: the orders owed are read with the column.
    if row.opt_text("retry_of")?.as_deref() != plan.retry_of.as_ref().map(|r| r.as_str()) {
        return Err(corrupt("the retry_of column and the plan disagree"));
    }
    Ok(RolloutRecord {
        id: RolloutId::parse(&row.text("id")?).map_err(corrupt)?,
        bundle_sha256: Sha256Hex::parse(&row.text("bundle_sha256")?).map_err(corrupt)?,
        state: RolloutState::parse(&state).ok_or_else(|| corrupt(format!("state {state:?}")))?,
        phase: parse_phase(&row.text("phase")?)?,
        current_wave: count(row, "current_wave")?,
        plan,
        bake_until: row.opt_int("bake_until")?,
        halt_reason: row.opt_text("halt_reason")?,
        ack_failures: count(row, "ack_failures")?,
        ack_alerts: count(row, "ack_alerts")?,
        created_at: row.int("created_at")?,
        updated_at: row.int("updated_at")?,
    })
}

pub(super) fn dispatch(row: &impl Fields) -> Result<DispatchRecord> {
    let outcome = match row.text("outcome")?.as_str() {
        "dispatched" => Outcome::Dispatched,
        "timed_out" => Outcome::TimedOut,
        "reported" | "reported_late" => {
            let text = row
                .opt_text("report")?
                .ok_or_else(|| corrupt("reported dispatch without report"))?;
            Outcome::Reported(Box::new(from_json(&text)?))
        }
        other => return Err(corrupt(format!("outcome {other:?}"))),
    };
    let reported_late = row.text("outcome")? == "reported_late";
    Ok(DispatchRecord {
        rollout_id: RolloutId::parse(&row.text("rollout_id")?).map_err(corrupt)?,
        host: row.text("host")?,
        wave: count(row, "wave")?,
        dispatched_at: row.int("dispatched_at")?,
        outcome,
        reported_late,
    })
}

/// Columns `rollout_id`, `sha256`, `size`, `preview`, `retry_of` (the
/// pending-orders join).
pub(super) fn pending_order(row: &impl Fields) -> Result<PendingOrder> {
    Ok(PendingOrder {
        rollout_id: RolloutId::parse(&row.text("rollout_id")?).map_err(corrupt)?,
        bundle_sha256: Sha256Hex::parse(&row.text("sha256")?).map_err(corrupt)?,
        bundle_size: size(row, "size")?,
        preview: flag(row, "preview")?,
        retry: row.opt_text("retry_of")?.is_some(),
    })
}

/// A 0/1 column.
fn flag(row: &impl Fields, col: &str) -> Result<bool> {
    match row.int(col)? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(corrupt(format!("{col} {v}"))),
    }
}

/// The kill generation and the `kills` rows (`scope`, `reason`, `by_name`,
/// `at`) as one state.
pub(super) fn kill_state<F: Fields>(generation: Option<i64>, rows: &[F]) -> Result<KillState> {
    let generation = generation.unwrap_or(0);
    let mut state = KillState {
        generation: u64::try_from(generation)
            .map_err(|_| corrupt(format!("kill generation {generation}")))?,
        all: None,
        rollouts: vec![],
    };
    for r in rows {
        let scope = r.text("scope")?;
        let order = KillOrder {
            reason: r.text("reason")?,
            by: r.text("by_name")?,
            at: r.text("at")?,
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

pub(super) fn operator_log_entry(row: &impl Fields) -> Result<OperatorLogEntry> {
    Ok(OperatorLogEntry {
        seq: row.int("seq")?,
        at: row.int("at")?,
        actor: row.text("actor")?,
        action: row.text("action")?,
        detail: row.text("detail")?,
        prev_hash: row.text("prev_hash")?,
        hash: row.text("hash")?,
    })
}

/// The next operator log entry after the last one (`seq`, `hash`), or after
/// the genesis when the log is empty: the chaining both backends share.
pub(super) fn next_operator_log_entry(
    last: Option<(i64, String)>,
    actor: &str,
    action: &str,
    detail: String,
) -> OperatorLogEntry {
    let (prev_seq, prev_hash) = last.unwrap_or((0, AUDIT_GENESIS.to_string()));
    let seq = prev_seq + 1;
    let at = now_ms();
    let hash = operator_log_hash(&prev_hash, seq, at, actor, action, &detail);
    OperatorLogEntry {
        seq,
        at,
        actor: actor.into(),
        action: action.into(),
        detail,
        prev_hash,
        hash,
    }
}
