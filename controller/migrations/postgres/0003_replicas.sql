-- Live controller replicas (crate::cluster): each upserts its row every
-- second. A kill waits for the acknowledgements of the replicas seen in the
-- last few seconds. PostgreSQL only: a SQLite controller has no peers.
CREATE TABLE replicas (
    id BIGINT PRIMARY KEY,
    seen_at BIGINT NOT NULL
);
