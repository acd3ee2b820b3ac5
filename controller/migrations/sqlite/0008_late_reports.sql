-- A report that comes after its host timed out is stored with the outcome
-- 'reported_late' (it was 'reported'): the timeout keeps counting towards
-- the rollout's halts, so an operator's resume past it is not undone by the
-- late report. No column changes; this migration makes a controller from
-- before it refuse the database (it would read 'reported_late' as corrupt).
SELECT 1;
