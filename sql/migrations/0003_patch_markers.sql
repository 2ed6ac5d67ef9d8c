-- 0003: `ctx.patched` / `ctx.deprecate_patch` record a marker in the event log (kind
-- 'patch', named by the patch id), so that a replay takes the branch its first run took.
-- The new list only adds a value: every row already there passes it. ALTER TABLE checks
-- the rows again all the same, under the lock the DROP takes (a scan of durable.events,
-- once, while the migration runs).
alter table durable.events
    drop constraint events_kind_check,
    add constraint events_kind_check
        check (kind in ('step', 'transaction', 'child', 'sleep', 'event', 'memo', 'patch'));
