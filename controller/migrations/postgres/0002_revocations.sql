-- Revoked certificate serials shared by every replica
-- (`rollguard-controller revoke --config`), beside each one's revoked.list.
CREATE TABLE revoked (
    serial TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    at BIGINT NOT NULL
);
