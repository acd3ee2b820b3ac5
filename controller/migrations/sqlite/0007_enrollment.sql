-- One-time enrollment tokens (`rollguard-controller token create`): only
-- the SHA-256 of each token is kept. A token is used by one conditional
-- UPDATE (used_at NULL and not expired), so two replicas cannot both
-- accept it.
CREATE TABLE enrollment_tokens (
    hash TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER
);

-- Agent certificates a serving controller issued (enrollment): their
-- serials, so `agents remove` and `revoke --config` can revoke them by name
-- (the CA directory's issued/ is not where a serving controller writes).
CREATE TABLE issued_certs (
    serial TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    not_after INTEGER NOT NULL,
    issued_at INTEGER NOT NULL
);
CREATE INDEX issued_certs_name ON issued_certs (name);
