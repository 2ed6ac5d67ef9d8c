-- 0018: lock order between task trees, second round.
--
-- Every path that locks several tasks now takes them newest first, children before
-- parents (durable.lock_trees), the order a finishing child takes (its own row, then its
-- waiting parent's in durable.wake_waiting). The update trigger's cascade of a cancel, run
-- when an attempt ends cancelled after a cancel was requested, took a waiting child's row
-- and then a running grandchild's: with the grandchild finishing at that moment (holding
-- its own row, waiting for its parent's) Postgres failed one side with
-- DeadlockDetectedError. The trigger now locks the tree first. (The statements of
-- sql/queries.sql that changed with it, retry_many, complete, release, checkpoint and
-- prune_trees, need no migration.)

create or replace function durable.tasks_after_update() returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp as $$
declare
    limited text[];
    keyed text[];
    done bigint[];
    parents bigint[];
    children bigint[];
    ended bigint[];
    q text;
    t bigint;
begin
    if current_setting('durable.claiming', true) = 'on' then
        -- A claim's update (durable.claim flags it): its rows are all running, which
        -- none of the conditions below looks for. Skipping the pass spares the claim a
        -- query.
        return null;
    end if;
    -- One pass over the new rows, never a join with the old ones: a join of two
    -- transition tables is planned blind (the planner takes each for one row) and turns
    -- quadratic in the batch. So each condition reads the row's new state only: a row
    -- updated again in a state it was already in (rare) sends a spare, harmless notice.
    -- Work becoming ready is announced by tasks_notify_ready, row by row.
    -- The queues under a fleet-wide limit where a slot came free are looked up in the
    -- same statement (an aggregate of this pass inside its subquery): most completions
    -- free a slot in a queue without one, and a second statement would cost them all.
    select (select array_agg(c.name) from durable.queues c
             where c.concurrency is not null
               and c.name = any(array_agg(distinct n.queue) filter (
                                    where n.status not in ('running', 'queued')))),
           array_agg(distinct n.queue) filter (
               where n.status not in ('running', 'queued') and n.concurrency_key is not null),
           array_agg(n.id) filter (
               where n.notify_finish and n.status in ('completed', 'failed', 'cancelled')),
           array_agg(distinct n.parent_id order by n.parent_id) filter (
               where n.parent_id is not null
                 and n.status in ('completed', 'failed', 'cancelled')),
           array_agg(n.id) filter (
               where n.parent_id is not null
                 and n.status in ('completed', 'failed', 'cancelled')),
           array_agg(n.id) filter (where n.status = 'cancelled')
      into limited, keyed, done, parents, children, ended
      from new_rows n where n.status not in ('running', 'queued');
    if ended is not null and current_setting('durable.cascading', true) is distinct from 'on'
    then
        -- Whatever path ended a task cancelled (a cancel, or an attempt that ended
        -- after one was requested), its descendants go with it, including children
        -- started after the cancel's own cascade ran. Their rows first, newest first
        -- (durable.lock_trees): the cascade took a waiting child's row and then a
        -- grandchild's, while the grandchild, finishing, held its own and waited for its
        -- waiting parent's (durable.wake_waiting).
        perform durable.lock_trees(ended);
        perform durable.cancel_descendants(ended);
    end if;
    if limited is not null or keyed is not null then
        -- A slot under a fleet-wide or per-key limit came free: claimers may wait for it.
        for q in
            select k from unnest(keyed) k union select k from unnest(limited) k
        loop
            perform pg_notify('durable_ready', q);  -- a repeat within a transaction is dropped
        end loop;
    end if;
    if done is not null then
        foreach t in array done loop
            perform pg_notify('durable_done', t::text);
        end loop;
    end if;
    if parents is not null then
        perform durable.wake_waiting(parents, children);
    end if;
    return null;
end;
$$;
