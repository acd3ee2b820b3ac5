-- Revoked certificate serials shared by every controller on this database
-- (`rollguard-controller revoke --config`), beside each one's revoked.list.
CREATE TABLE IF NOT EXISTS revoked (
    serial TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    at INTEGER NOT NULL
);
