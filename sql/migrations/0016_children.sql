-- 0016: children and cancellation.
--
-- A cancel locked the cancelled task's row, then its children's; a child finishing at that
-- moment had locked its own row and waited (durable.wake_waiting) for its waiting
-- parent's. Postgres broke the deadlock by failing one of them: `client.cancel` raised
-- DeadlockDetectedError, or the child's completion was rolled back. durable.lock_trees
-- takes a tree's rows children first, the order a finishing child takes them in; cancels
-- and deadline expiry (expire_deadlines in queries.sql) lock through it.

-- Lock the rows of `ids` and of their unfinished descendants, newest first (a task is
-- newer than its parent): see schema.sql.
create function durable.lock_trees(ids bigint[]) returns void
language plpgsql
set search_path = pg_catalog, pg_temp as $$
begin
    perform 1 from durable.tasks t
     where t.id in (
               with recursive tree as (
                   select i as id from unnest(ids) as i
                   union
                   select c.id from durable.tasks c join tree on c.parent_id = tree.id
               )
               select tree.id from tree)
       and (t.id = any(ids) or t.status in ('queued', 'running', 'waiting'))
     order by t.id desc
       for update of t;
end;
$$;

create or replace function durable.cancel(ids bigint[])
returns table (id bigint, status text, already_finished boolean)
language plpgsql
set search_path = pg_catalog, pg_temp as $$
#variable_conflict use_column
declare
    outer_cascade text := current_setting('durable.cascading', true);
    asked bigint[] := '{}';
    r record;
begin
    -- Lock first, read in a later statement: its snapshot sees an outcome that committed
    -- before the lock was granted, and an outcome written after this commits sees the
    -- request. The whole tree, children before parents (see durable.lock_trees).
    perform durable.lock_trees(ids);
    perform set_config('durable.cascading', 'on', true);  -- the cascade is below
    for r in
        update durable.tasks t
           set cancel_requested = true,
               status = case when t.status = 'running' then 'running' else 'cancelled' end,
               finished_at = case when t.status = 'running' then null else now() end,
               wake_at = null, waiting_on = null, waiting_event = null
         where t.id = any(ids) and t.status in ('queued', 'running', 'waiting')
        returning t.id, t.status::text as status
    loop
        if r.status = 'running' then
            perform pg_notify('durable_control', 'cancel:' || r.id);
        end if;
        asked := asked || r.id;
        id := r.id;
        status := r.status;
        already_finished := false;
        return next;
    end loop;
    perform set_config('durable.cascading', coalesce(outer_cascade, ''), true);
    return query
        select t.id, t.status::text, true from durable.tasks t
         where t.id = any(ids) and t.status in ('completed', 'failed', 'cancelled')
           and not t.id = any(asked);
    if asked <> '{}' then
        return query select d.id, d.status, false from durable.cancel_descendants(asked) d;
    end if;
end;
$$;
