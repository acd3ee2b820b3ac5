-- The inventory (`rollguard agents`): what each agent said when it last
-- connected, and where. Written in batches by src/presence.rs. NULL where
-- an agent has not connected since this migration. `connected_to` is the
-- id of the controller replica holding its order stream (0 for a SQLite
-- controller), NULL once it went away; whether that replica is alive is
-- the `replicas` table's answer (PostgreSQL), so a replica that died
-- without saying so leaves no agent "connected".
ALTER TABLE agents ADD COLUMN first_seen INTEGER;
ALTER TABLE agents ADD COLUMN last_seen INTEGER;
ALTER TABLE agents ADD COLUMN agent_version TEXT;
ALTER TABLE agents ADD COLUMN kernel TEXT;
ALTER TABLE agents ADD COLUMN landlock_abi INTEGER;
ALTER TABLE agents ADD COLUMN connected_to INTEGER;
-- The certificate it last connected with: revoked by `agents remove`,
-- and its expiry is what `rollguard agents` and the metrics show.
ALTER TABLE agents ADD COLUMN cert_serial TEXT;
ALTER TABLE agents ADD COLUMN cert_not_after INTEGER;
