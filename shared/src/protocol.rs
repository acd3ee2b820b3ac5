//! The controller ⇄ agent ⇄ operator wire protocol (JSON over mutual-TLS
//! HTTP/2).
//!
//! Transport, and why: each agent keeps **one** HTTP/2 connection to the
//! controller. On it, one long-lived `POST /v1/agent/connect` request carries
//! the agent's registration in its body and receives the controller's
//! [`Order`]s as newline-delimited JSON in its streaming response; run
//! reports, kill acknowledgements and bundle downloads are ordinary requests
//! multiplexed on the same connection. Compared with WebSocket this needs no
//! extra protocol or crate on either side, every report gets a real HTTP
//! status as its acknowledgement, and an idle agent costs the controller one
//! TLS session and one HTTP/2 stream (no thread).
//!
//! Endpoints (all need a client certificate; the role is decided by the
//! issuing CA, see `controller/src/pki.rs`):
//!
//! | method and path | who | body → answer |
//! | --- | --- | --- |
//! | `POST /v1/agent/connect` | agent | [`Register`] → stream of [`Order`] lines |
//! | `POST /v1/agent/reports` | agent | [`AgentReport`] → 204 |
//! | `POST /v1/agent/kill-ack` | agent | [`KillAck`] → 204 |
//! | `GET /v1/bundles/{sha256}` | agent, operator | → bundle bytes |
//! | `PUT /v1/bundles/{sha256}` | operator | bundle bytes → [`BundleSummary`] |
//! | `POST /v1/rollouts/plan` | operator | [`RolloutRequest`] → [`Plan`] |
//! | `POST /v1/rollouts` | operator | [`RolloutRequest`] → [`RolloutStatus`] |
//! | `GET /v1/rollouts` | operator | → `[RolloutStatus]` |
//! | `GET /v1/rollouts/{id}` | operator | → [`RolloutStatus`] |
//! | `POST /v1/rollouts/{id}/halt` | operator | [`HaltRequest`] → [`RolloutStatus`] |
//! | `POST /v1/rollouts/{id}/resume` | operator | → [`RolloutStatus`] |
//! | `POST /v1/rollouts/{id}/retry` | operator | [`RetryRequest`] → [`RetryResponse`] |
//! | `POST /v1/kill` | operator | [`KillRequest`] → [`KillResponse`] |
//! | `POST /v1/kill/lift` | operator | [`LiftRequest`] → [`KillResponse`] |
//! | `GET /v1/kill` | operator | → [`KillState`] |
//! | `GET /v1/agents` | operator | → `[AgentInfo]` |
//! | `POST /v1/alerts/alertmanager` | operator, alert source | Alertmanager webhook → [`AlertResponse`] |
//! | `GET /metrics` | operator, alert source | → Prometheus text |
//!
//! Errors are `{"error": "..."}` with a 4xx/5xx status.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub use crate::alert_matcher::Matchers;
use crate::report::RunReport;

/// Largest JSON body any endpoint accepts (bundle uploads have their own
/// limit).
pub const MAX_JSON_BODY: usize = 256 * 1024;
/// Longest line of the order stream an agent accepts.
pub const MAX_ORDER_LINE: usize = 64 * 1024;
/// Seconds between keep-alive [`Order::Ping`]s on an idle order stream.
pub const PING_INTERVAL_SECS: u64 = 20;

crate::validated_string! {
    /// A rollout identifier: `r-` followed by lowercase hex/digits, or any
    /// `[a-z0-9-]{1,64}`. Agents use it as a file name, so it is parsed,
    /// never trusted.
    pub struct RolloutId;
    error BadRolloutId = "rollout id {0:?} is invalid: use 1-64 characters of [a-z0-9-]";
    check = crate::manifest::is_slug;
}

crate::validated_string! {
    /// A SHA-256 digest as 64 lowercase hex digits (bundle identity).
    pub struct Sha256Hex;
    error BadDigest = "{0:?} is not a SHA-256 digest (64 lowercase hex digits)";
    check = |raw: &str| {
        raw.len() == 64
            && raw
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
}

impl Sha256Hex {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        use sha2::Digest;
        Sha256Hex::from_trusted(hex::encode(sha2::Sha256::digest(bytes)))
    }

    /// The digest a hasher fed piece by piece has computed.
    pub fn from_digest(hasher: sha2::Sha256) -> Self {
        use sha2::Digest;
        Sha256Hex::from_trusted(hex::encode(hasher.finalize()))
    }
}

// ---- agent side -------------------------------------------------------------

/// Body of `POST /v1/agent/connect`. The name must equal the certificate's
/// common name: an agent cannot register as another host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Register {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub agent_version: String,
    /// The host's kernel release (`uname -r`), for the inventory.
    #[serde(default)]
    pub kernel: String,
    /// The Landlock ABI the host's kernel offers; `None`: none.
    #[serde(default)]
    pub landlock_abi: Option<u32>,
}

/// One line of the order stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Order {
    /// Run this rollout's bundle once. Agents dedupe by `rollout_id`: a
    /// second order for a rollout already started is answered with the
    /// stored report (or `interrupted`), never a second run.
    Run {
        rollout_id: RolloutId,
        bundle_sha256: Sha256Hex,
        bundle_size: u64,
        /// A retry rollout's order (`rollguard rollout retry`): the agent
        /// may run the version it last started again, only if its own
        /// record says that run did not succeed and had no denial, a
        /// bounded number of times. Left out of the JSON when unset; when
        /// set, an agent from before retries refuses the line (unknown
        /// field) instead of treating it as a plain run.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        retry: bool,
    },
    /// Run this rollout's bundle once as a preview (`rollguard-agent run
    /// --preview`): nothing reaches the disk, no service action, no version
    /// used up; the report lists the changes. Its own order, not a flag on
    /// `Run`: an agent that does not know it refuses the line (unknown
    /// type) instead of running the bundle for real. Deduped like `Run`.
    Preview {
        rollout_id: RolloutId,
        bundle_sha256: Sha256Hex,
        bundle_size: u64,
    },
    /// The complete fleet kill state. Sent on connect and on every change;
    /// the agent replaces its stored fleet kill state with it, kills running
    /// bundles newly in scope, then acknowledges `generation`.
    KillState(KillState),
    /// Keep-alive; carries nothing.
    Ping,
}

/// The kill orders in force, as a whole.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KillState {
    /// Increases with every change; acknowledgements name it.
    pub generation: u64,
    /// A fleet-wide kill: every bundle, every rollout.
    #[serde(default)]
    pub all: Option<KillOrder>,
    /// Kills limited to one rollout each.
    #[serde(default)]
    pub rollouts: Vec<RolloutKill>,
}

impl KillState {
    /// The kill order that forbids running `rollout`, if any.
    pub fn covering(&self, rollout: &RolloutId) -> Option<&KillOrder> {
        self.all.as_ref().or_else(|| {
            self.rollouts
                .iter()
                .find(|k| &k.rollout_id == rollout)
                .map(|k| &k.order)
        })
    }
    pub fn is_empty(&self) -> bool {
        self.all.is_none() && self.rollouts.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KillOrder {
    pub reason: String,
    /// Who ordered it (operator certificate name, or `local` on a host).
    pub by: String,
    /// RFC 3339.
    pub at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutKill {
    pub rollout_id: RolloutId,
    #[serde(flatten)]
    pub order: KillOrder,
}

/// Body of `POST /v1/agent/reports`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentReport {
    pub rollout_id: RolloutId,
    pub report: RunReport,
}

/// Body of `POST /v1/agent/kill-ack`: the agent applied this kill state (all
/// running bundles it covers are dead).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KillAck {
    pub generation: u64,
    /// Bundles killed while applying it.
    #[serde(default)]
    pub killed: u32,
}

// ---- operator side ------------------------------------------------------------

/// One wave size as the operator wrote it: an absolute count or a percentage
/// of the in-scope hosts; sizes are cumulative. Only ever a count of at
/// least 1 or a percentage from 1 to 100, from JSON too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    rename_all = "snake_case",
    deny_unknown_fields,
    try_from = "UncheckedWaveSize"
)]
pub enum WaveSize {
    Count(u32),
    Percent(u8),
}

/// [`WaveSize`]'s wire form, before its bounds are checked.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum UncheckedWaveSize {
    Count(u32),
    Percent(u8),
}

impl TryFrom<UncheckedWaveSize> for WaveSize {
    type Error = BadWaveSize;
    fn try_from(raw: UncheckedWaveSize) -> Result<Self, BadWaveSize> {
        match raw {
            UncheckedWaveSize::Count(0) => Err(BadWaveSize("0".into())),
            UncheckedWaveSize::Count(n) => Ok(WaveSize::Count(n)),
            UncheckedWaveSize::Percent(p) if p == 0 || p > 100 => Err(BadWaveSize(format!("{p}%"))),
            UncheckedWaveSize::Percent(p) => Ok(WaveSize::Percent(p)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("wave size {0:?} is invalid: use a host count (1, 5, ...) or a percentage from 1% to 100%")]
pub struct BadWaveSize(pub String);

impl WaveSize {
    pub fn parse(raw: &str) -> Result<Self, BadWaveSize> {
        let bad = || BadWaveSize(raw.to_string());
        let raw_t = raw.trim();
        if let Some(p) = raw_t.strip_suffix('%') {
            let p: u8 = p.trim().parse().map_err(|_| bad())?;
            if p == 0 || p > 100 {
                return Err(bad());
            }
            Ok(WaveSize::Percent(p))
        } else {
            let n: u32 = raw_t.parse().map_err(|_| bad())?;
            if n == 0 {
                return Err(bad());
            }
            Ok(WaveSize::Count(n))
        }
    }

    /// Parse a comma-separated list such as `1,5%,25%,100%`.
    pub fn parse_list(raw: &str) -> Result<Vec<Self>, BadWaveSize> {
        raw.split(',').map(WaveSize::parse).collect()
    }

    /// The cumulative number of hosts this size means out of `total`
    /// (percentages round up, so 1% of 5 hosts is 1 host, not 0).
    pub fn cumulative(&self, total: usize) -> usize {
        match *self {
            WaveSize::Count(n) => (n as usize).min(total),
            WaveSize::Percent(p) => (total * p as usize).div_ceil(100).min(total),
        }
    }
}

impl fmt::Display for WaveSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaveSize::Count(n) => write!(f, "{n}"),
            WaveSize::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// Longest bake between two waves: 30 days.
pub const MAX_BAKE_SECS: u64 = 30 * 24 * 3600;

/// Body of `POST /v1/rollouts` and `POST /v1/rollouts/plan`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutRequest {
    pub bundle_sha256: Sha256Hex,
    pub waves: Vec<WaveSize>,
    /// Seconds to watch halt conditions after a wave before the next; at
    /// most [`MAX_BAKE_SECS`].
    pub bake_secs: u64,
    pub max_failures: u32,
    #[serde(default)]
    pub canaries: Vec<String>,
    /// Alertmanager matchers (`=`, `!=`, `=~`, `!~`) an alert must all
    /// match to halt (or hold back) this rollout; empty means the default
    /// `severity=critical`. Serialized as a map when every matcher is an
    /// equality (the form before operators existed), else as a list
    /// ([`crate::alert_matcher`]).
    #[serde(default)]
    pub halt_on: Matchers,
    /// Allow a first wave that is every in-scope host (no canary). Refused
    /// otherwise: sending to every server at once is how the 2012 incident
    /// destroyed backups along with everything else.
    #[serde(default)]
    pub all_at_once: bool,
    /// Only the in-scope hosts matching one of these (`--limit`); empty:
    /// all of them. Narrows the bundle's targets, never widens them.
    #[serde(default)]
    pub limit: Vec<crate::targets::HostPattern>,
    /// In-scope hosts matching one of these are left out (`--exclude`).
    #[serde(default)]
    pub exclude: Vec<crate::targets::HostPattern>,
    /// Send to in-scope hosts that are not connected, too
    /// (`--include-offline`); by default they are left out and named in
    /// the plan's `offline`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub include_offline: bool,
    /// A preview rollout (`rollout start --preview`): every in-scope host
    /// at once, nothing changed anywhere, never halted by what it finds.
    /// (Each of these three is left out of the JSON when unset, so an
    /// operator CLI that knows them can still start a plain rollout on a
    /// controller that does not.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preview: bool,
    /// Start only if this preview rollout of the same bundle came out
    /// clean on every host of this one (`--after-preview`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_preview: Option<RolloutId>,
    /// Start after an unclean preview anyway, for this reason (logged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub override_reason: Option<String>,
}

/// How a rollout follows a preview (see [`RolloutRequest::after_preview`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AfterPreview {
    pub rollout: RolloutId,
    /// Why it started although the preview was not clean; `None`: it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub override_reason: Option<String>,
}

/// Answer of `PUT /v1/bundles/{sha256}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleSummary {
    pub sha256: Sha256Hex,
    pub name: String,
    pub version: u64,
    pub size: u64,
}

/// What a rollout will touch, shown before anything runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub bundle: BundleSummary,
    pub targets: serde_json::Value,
    pub scope: serde_json::Value,
    /// The manifest's `[services]`: what the agents will reload or restart
    /// after the run (null when the bundle has none).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub services: serde_json::Value,
    /// Signer identities found in the bundle, as the bundle names them. The
    /// controller does not verify them: each agent does, against its own
    /// policy.
    pub signers: Vec<String>,
    pub timeout_secs: u64,
    pub bake_secs: u64,
    pub max_failures: u32,
    pub halt_on: Matchers,
    /// Hosts per wave, in dispatch order.
    pub waves: Vec<Vec<String>>,
    /// Registered agents that are not in the bundle's targets.
    pub out_of_scope: usize,
    /// In-scope hosts left out by `--limit`/`--exclude`, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_out: Vec<String>,
    /// In-scope hosts not connected when the plan was made, sorted: left
    /// out of the waves unless `include_offline`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub offline: Vec<String>,
    /// The offline hosts are in the waves all the same.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub include_offline: bool,
    /// A preview rollout: nothing changes on any host.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preview: bool,
    /// The clean (or overridden) preview this rollout follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_preview: Option<AfterPreview>,
    /// The rollout whose failed hosts this one retries (`rollout retry`):
    /// the same bundle, sent as `Order::Run` with `retry`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_of: Option<RolloutId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    Running,
    Halted,
    Completed,
}

impl RolloutState {
    pub fn as_str(&self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Halted => "halted",
            RolloutState::Completed => "completed",
        }
    }
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "running" => Some(RolloutState::Running),
            "halted" => Some(RolloutState::Halted),
            "completed" => Some(RolloutState::Completed),
            _ => None,
        }
    }
}

/// Where a running rollout is inside its current wave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WavePhase {
    Dispatching,
    Awaiting,
    Baking,
}

/// One host's part in a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRun {
    pub host: String,
    pub wave: u32,
    /// `pending` (not dispatched), `dispatched`, `timed_out`, or the
    /// reported [`crate::report::RunStatus`] in snake case.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<RunReport>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutStatus {
    pub id: RolloutId,
    pub state: RolloutState,
    pub phase: WavePhase,
    /// Index of the current wave (0-based); equals the wave count when done.
    pub current_wave: u32,
    pub wave_count: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake_until: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halt_reason: Option<String>,
    pub plan: Plan,
    pub hosts: Vec<HostRun>,
    pub created_at: String,
    pub updated_at: String,
}

/// One rollout as a list shows it (`GET /v1/rollouts?summary=true`): the
/// bundle and where the rollout is, with its hosts counted by state and no
/// reports, so a list of rollouts over thousands of hosts stays small.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutSummary {
    pub id: RolloutId,
    pub state: RolloutState,
    pub phase: WavePhase,
    pub current_wave: u32,
    pub wave_count: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halt_reason: Option<String>,
    pub bundle: BundleSummary,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preview: bool,
    /// Hosts in the rollout.
    pub hosts: u32,
    /// Hosts by state (as [`HostRun::state`] names them).
    pub host_states: BTreeMap<String, u32>,
    /// Denials the hosts reported, listed or counted.
    pub denials: u64,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&RolloutStatus> for RolloutSummary {
    fn from(s: &RolloutStatus) -> Self {
        let mut host_states = BTreeMap::new();
        let mut denials = 0u64;
        for h in &s.hosts {
            *host_states.entry(h.state.clone()).or_insert(0) += 1;
            if let Some(r) = &h.report {
                let listed = r.denials.as_ref().map_or(0, |d| d.len() as u64);
                denials += listed.max(r.denial_count.unwrap_or(0));
            }
        }
        RolloutSummary {
            id: s.id.clone(),
            state: s.state,
            phase: s.phase,
            current_wave: s.current_wave,
            wave_count: s.wave_count,
            halt_reason: s.halt_reason.clone(),
            bundle: s.plan.bundle.clone(),
            preview: s.plan.preview,
            hosts: s.hosts.len() as u32,
            host_states,
            denials,
            created_at: s.created_at.clone(),
            updated_at: s.updated_at.clone(),
        }
    }
}

/// Body of `POST /v1/rollouts/{id}/retry` (`rollout retry ID --failed`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryRequest {
    /// Retry the hosts whose run failed, timed out, was killed or was
    /// interrupted, with no denial. Required (the only selection so far),
    /// so a retry always says what it retries.
    pub failed: bool,
}

/// A host of the original rollout that a retry leaves out, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetrySkipped {
    pub host: String,
    /// Its state in the original rollout (as in [`HostRun::state`]).
    pub state: String,
    pub why: String,
}

/// Answer of `POST /v1/rollouts/{id}/retry`: the new rollout, the hosts it
/// retries (in dispatch order) and the ones it leaves out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryResponse {
    pub retry_of: RolloutId,
    pub retried: Vec<String>,
    pub skipped: Vec<RetrySkipped>,
    pub rollout: RolloutStatus,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaltRequest {
    pub reason: String,
}

/// Body of `POST /v1/rollouts/{id}/resume`: why, kept in the operator log.
/// Optional: `{}` resumes without one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResumeRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What a kill order covers: `"all"` or `{"rollout": "r-..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum KillScope {
    All,
    Rollout(RolloutId),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KillRequest {
    pub scope: KillScope,
    pub reason: String,
}

/// Lifts the kill orders in force: all of them (`scope` absent) or one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiftRequest {
    #[serde(default)]
    pub scope: Option<KillScope>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KillResponse {
    pub state: KillState,
    pub halted_rollouts: Vec<RolloutId>,
    /// Agents connected when the order was pushed.
    pub agents_sent: u32,
    /// Agents that acknowledged (their covered bundles are dead) before the
    /// controller answered.
    pub agents_acked: u32,
    /// Agents that had not acknowledged in time, by name.
    pub agents_pending: Vec<String>,
    /// Controller replicas (PostgreSQL) that did not say in time how their
    /// agents took the order: their agents are in none of the counts above.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub replicas_silent: u32,
    /// Covered rollouts the controller could not mark halted (its database
    /// failed). The kill is in force and was sent all the same: their
    /// agents refuse and kill their runs. `rollout halt` them, or retry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub halt_errors: Vec<String>,
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

/// One registered agent, as `GET /v1/agents` (`rollguard agents`) shows it.
/// Times are RFC 3339; `None` (absent) where the agent has not said since
/// the controller began recording it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Its order stream is open on a live controller replica.
    pub connected: bool,
    /// The controller (replica host name) it is connected to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<String>,
    /// Now, while connected; when it went away, once it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub landlock_abi: Option<u32>,
    /// When the certificate it last connected with expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_expires: Option<String>,
}

/// Answer of `DELETE /v1/agents/{name}` (`rollguard agents remove`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRemoved {
    pub name: String,
    /// Certificate serials now refused by every replica.
    pub revoked_serials: Vec<String>,
    /// Whether its open order stream was closed.
    pub was_connected: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertResponse {
    pub firing: u32,
    pub halted_rollouts: Vec<RolloutId>,
}

/// Error body of every endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

impl ErrorBody {
    /// What an error answer says: its `error`, or the body as text when it
    /// is not an error body (a proxy's page, a truncated answer).
    pub fn message_of(body: &[u8]) -> String {
        serde_json::from_slice::<ErrorBody>(body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned())
    }
}

/// Largest body of the enrollment listener's requests.
pub const MAX_ENROLL_BODY: usize = 32 * 1024;

/// `POST /v1/enroll` (the enrollment listener, no client certificate): a
/// one-time token, the host's name and a PEM certificate signing request for
/// a key the host generated. The certificate's name is the token's host
/// (which must be `name`), never the request's subject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub token: String,
    /// The host name the enrolling host expects; a token made for another
    /// host is refused (and not used up).
    pub name: String,
    pub csr: String,
}

/// `POST /v1/agent/renew` (the main listener, the agent's certificate): a
/// signing request for a new key; the new certificate has the caller's
/// certificate's name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    pub csr: String,
}

/// The answer to both: the agent's certificate and the fleet's root CA, PEM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollResponse {
    pub cert: String,
    pub ca: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollout_ids_are_file_name_safe() {
        assert!(RolloutId::parse("r-20261123-abc").is_ok());
        for bad in ["", "../x", "a/b", "A", "-x", &"a".repeat(65)] {
            assert!(RolloutId::parse(bad).is_err(), "{bad:?}");
        }
        assert!(serde_json::from_str::<RolloutId>("\"../../etc\"").is_err());
    }

    #[test]
    fn wave_sizes() {
        let w = WaveSize::parse_list("1,5%,25%,100%").unwrap();
        assert_eq!(
            w,
            vec![
                WaveSize::Count(1),
                WaveSize::Percent(5),
                WaveSize::Percent(25),
                WaveSize::Percent(100)
            ]
        );
        assert_eq!(WaveSize::Percent(5).cumulative(10), 1);
        assert_eq!(WaveSize::Percent(25).cumulative(10), 3);
        assert_eq!(WaveSize::Percent(100).cumulative(10), 10);
        assert_eq!(WaveSize::Count(50).cumulative(10), 10);
        for bad in ["0", "0%", "101%", "x", "", "-1", "5 %%"] {
            assert!(WaveSize::parse(bad).is_err(), "{bad:?}");
        }
    }

    /// A request's JSON is held to the same bounds as the CLI's text: a
    /// 200% wave would have been twice the hosts, and a panic.
    #[test]
    fn wave_sizes_from_json_are_checked_too() {
        for good in [r#"{"count":3}"#, r#"{"percent":100}"#] {
            let w: WaveSize = serde_json::from_str(good).unwrap();
            assert_eq!(serde_json::to_string(&w).unwrap(), good);
        }
        for bad in [
            r#"{"percent":200}"#,
            r#"{"percent":0}"#,
            r#"{"count":0}"#,
            r#"{"percent":300}"#,
            r#"{"share":5}"#,
        ] {
            assert!(serde_json::from_str::<WaveSize>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn orders_round_trip_as_lines() {
        let orders = vec![
            Order::Run {
                rollout_id: RolloutId::parse("r-1").unwrap(),
                bundle_sha256: Sha256Hex::of(b"x"),
                bundle_size: 1,
                retry: false,
            },
            Order::Run {
                rollout_id: RolloutId::parse("r-3").unwrap(),
                bundle_sha256: Sha256Hex::of(b"x"),
                bundle_size: 1,
                retry: true,
            },
            Order::KillState(KillState {
                generation: 3,
                all: Some(KillOrder {
                    reason: "stop".into(),
                    by: "op".into(),
                    at: "2026-01-01T00:00:00Z".into(),
                }),
                rollouts: vec![RolloutKill {
                    rollout_id: RolloutId::parse("r-2").unwrap(),
                    order: KillOrder {
                        reason: "x".into(),
                        by: "op".into(),
                        at: "t".into(),
                    },
                }],
            }),
            Order::Ping,
        ];
        for o in orders {
            let line = serde_json::to_string(&o).unwrap();
            assert!(!line.contains('\n'));
            assert_eq!(serde_json::from_str::<Order>(&line).unwrap(), o);
        }
        assert!(serde_json::from_str::<Order>(r#"{"type":"run","rollout_id":"r-1"}"#).is_err());
        assert!(serde_json::from_str::<Order>(r#"{"type":"format_disk"}"#).is_err());
    }

    /// `Order` as agents from before retries decode it.
    #[derive(Debug, Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
    #[allow(dead_code)]
    enum OrderBeforeRetries {
        Run {
            rollout_id: RolloutId,
            bundle_sha256: Sha256Hex,
            bundle_size: u64,
        },
        Ping,
    }

    #[test]
    fn a_retry_order_is_refused_by_an_agent_from_before_retries() {
        let order = |retry| Order::Run {
            rollout_id: RolloutId::parse("r-1").unwrap(),
            bundle_sha256: Sha256Hex::of(b"x"),
            bundle_size: 1,
            retry,
        };
        // A plain run is the line it always was.
        let plain = serde_json::to_string(&order(false)).unwrap();
        assert!(!plain.contains("retry"), "{plain}");
        serde_json::from_str::<OrderBeforeRetries>(&plain).unwrap();
        // A retry is an unknown field to an older agent: the line is
        // refused, never run as a plain order.
        let retry = serde_json::to_string(&order(true)).unwrap();
        assert!(retry.contains(r#""retry":true"#), "{retry}");
        let e = serde_json::from_str::<OrderBeforeRetries>(&retry).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        // And this side refuses fields it does not know either.
        assert!(serde_json::from_str::<Order>(
            r#"{"type":"run","rollout_id":"r-1","bundle_sha256":"2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881","bundle_size":1,"force":true}"#
        )
        .is_err());
    }

    #[test]
    fn kill_scope_coverage() {
        let order = KillOrder {
            reason: "r".into(),
            by: "op".into(),
            at: "t".into(),
        };
        let r1 = RolloutId::parse("r-1").unwrap();
        let r2 = RolloutId::parse("r-2").unwrap();
        let mut k = KillState::default();
        assert!(k.covering(&r1).is_none());
        k.rollouts.push(RolloutKill {
            rollout_id: r1.clone(),
            order: order.clone(),
        });
        assert!(k.covering(&r1).is_some());
        assert!(k.covering(&r2).is_none());
        k.all = Some(order);
        assert!(k.covering(&r2).is_some());
    }

    #[test]
    fn kill_requests() {
        let all: KillRequest = serde_json::from_str(r#"{"scope":"all","reason":"x"}"#).unwrap();
        assert_eq!(all.scope, KillScope::All);
        let one: KillRequest =
            serde_json::from_str(r#"{"scope":{"rollout":"r-1"},"reason":"x"}"#).unwrap();
        assert!(matches!(one.scope, KillScope::Rollout(_)));
        assert!(serde_json::from_str::<KillRequest>(
            r#"{"scope":{"rollout":"../x"},"reason":"x"}"#
        )
        .is_err());
        let lift_all: LiftRequest = serde_json::from_str("{}").unwrap();
        assert_eq!(lift_all.scope, None);
    }
}
