-- The schema as of the first release. IF NOT EXISTS: a database created
-- before sqlx's migrator already holds it (see ../README.md).
CREATE TABLE IF NOT EXISTS agents (
    name TEXT PRIMARY KEY,
    labels TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS bundles (
    sha256 TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    size INTEGER NOT NULL,
    manifest BLOB NOT NULL,
    signers TEXT NOT NULL,
    bytes BLOB NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rollouts (
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
CREATE TABLE IF NOT EXISTS dispatches (
    rollout_id TEXT NOT NULL REFERENCES rollouts(id),
    host TEXT NOT NULL,
    wave INTEGER NOT NULL,
    dispatched_at INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    report TEXT,
    reported_at INTEGER,
    PRIMARY KEY (rollout_id, host)
);
CREATE INDEX IF NOT EXISTS dispatches_by_host ON dispatches(host, outcome);
CREATE TABLE IF NOT EXISTS kills (
    scope TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    by_name TEXT NOT NULL,
    at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
