-- Retry rollouts (`rollout retry ID --failed`): the rollout whose failed
-- hosts this one retries, or NULL. Also in the plan's JSON; the column is
-- what the orders owed to a reconnecting agent are read with (a retry's
-- are `Order::Run` with `retry`), and this migration makes a controller
-- from before retries refuse the database (it would send a retry's orders
-- without the marker, which every host that ran the version refuses).
ALTER TABLE rollouts ADD COLUMN retry_of TEXT;
