-- The schema of sqlite/0001_initial.sql in PostgreSQL's dialect.
CREATE TABLE agents (
    name TEXT PRIMARY KEY,
    labels TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE TABLE bundles (
    sha256 TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version BIGINT NOT NULL,
    size BIGINT NOT NULL,
    manifest BYTEA NOT NULL,
    signers TEXT NOT NULL,
    bytes BYTEA NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE rollouts (
    id TEXT PRIMARY KEY,
    bundle_sha256 TEXT NOT NULL REFERENCES bundles(sha256),
    state TEXT NOT NULL,
    phase TEXT NOT NULL,
    current_wave BIGINT NOT NULL,
    plan TEXT NOT NULL,
    bake_until BIGINT,
    halt_reason TEXT,
    ack_failures BIGINT NOT NULL DEFAULT 0,
    ack_alerts BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX rollouts_by_state ON rollouts(state);
CREATE TABLE dispatches (
    rollout_id TEXT NOT NULL REFERENCES rollouts(id),
    host TEXT NOT NULL,
    wave BIGINT NOT NULL,
    dispatched_at BIGINT NOT NULL,
    outcome TEXT NOT NULL,
    report TEXT,
    reported_at BIGINT,
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
    value BIGINT NOT NULL
);
CREATE TABLE audit (
    seq BIGINT PRIMARY KEY,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
