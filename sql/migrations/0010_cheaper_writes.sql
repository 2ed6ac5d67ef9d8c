-- 0010: two costs taken off the hot path.
--
-- Checkpoints travel with their times as seconds since the epoch. A timestamptz parameter
-- costs the daemon more to encode than the rest of the row's fields together; a double
-- precision costs next to nothing, and to_timestamp turns it back on the server.
-- durable.checkpoint_row stays for the daemons of the previous release during a rolling
-- deploy.
create type durable.checkpoint_epoch_row as (
    task_id     bigint,
    token       bigint,
    branch      integer,
    seq         integer,
    kind        text,
    name        text,
    digest      text,
    status      text,
    result      text,
    error       text,
    attempt     integer,
    started_at  double precision,
    wake_at     double precision
);

-- parent_id loses its foreign key. The key's check ran for every task inserted, as a
-- trigger event queued and fired per row even when parent_id is null (most tasks): about
-- a tenth of a bulk insert's server time. A child is inserted only in its running
-- parent's fenced transaction, which locks the parent's row before it commits, so the
-- reference holds when written; what ON DELETE SET NULL did is done by the delete trigger
-- below, once per statement.
alter table durable.tasks drop constraint tasks_parent_id_fkey;

create or replace function durable.tasks_after_delete() returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp as $$
begin
    delete from durable.events e using old_rows o where e.task_id = o.id;
    -- The children of a deleted task lose their parent, and only then: an update that
    -- matches no row still fires the update trigger's pass.
    if exists (select 1 from durable.tasks t join old_rows o on t.parent_id = o.id) then
        update durable.tasks t set parent_id = null from old_rows o where t.parent_id = o.id;
    end if;
    return null;
end;
$$;

-- The update trigger's pass finds the queues under a fleet-wide limit where a slot came
-- free in the same statement as the rest, rather than in a second one that every
-- completion paid (about 35 µs a statement, most of them freeing a slot in a queue with
-- no limit).
create or replace function durable.tasks_after_update() returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp as $$
declare
    limited text[];
    keyed text[];
    done bigint[];
    parents bigint[];
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
           array_agg(n.id) filter (where n.status = 'cancelled')
      into limited, keyed, done, parents, ended
      from new_rows n where n.status not in ('running', 'queued');
    if ended is not null and current_setting('durable.cascading', true) is distinct from 'on'
    then
        -- Whatever path ended a task cancelled (a cancel, or an attempt that ended
        -- after one was requested), its descendants go with it, including children
        -- started after the cancel's own cascade ran.
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
        perform durable.wake_waiting(parents);
    end if;
    return null;
end;
$$;
