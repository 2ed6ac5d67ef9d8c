-- Maintenance statements that cannot be prepared (utility commands), run as written by
-- durable/store/operations.py. queries.sql holds every statement that can.

-- name: vacuum_history
-- What pruning and claims leave dead, made reusable: without it (autovacuum off) every
-- deleted row and every claim's old row version keeps its space, and the claim reads
-- past the dead entries of the ready index. ANALYZE too: with autovacuum off nothing
-- else keeps the planner's statistics. SKIP_LOCKED: a table another pass is vacuuming
-- now is left to that pass.
vacuum (analyze, skip_locked) durable.tasks, durable.events, durable.signals
