-- Preview rollouts (`rollout start --preview`): 1 sends `Order::Preview`,
-- never `Order::Run`. Also in the plan's JSON; the column is what the
-- orders owed to a reconnecting agent are read with, and this migration
-- makes a controller from before previews refuse the database (it would
-- read a preview's plan as a real rollout and send real run orders).
ALTER TABLE rollouts ADD COLUMN preview BIGINT NOT NULL DEFAULT 0;
