-- 0004: resuming a long-lived workflow costs the same at its 10,000th event as at its
-- 10th. A wait finds the next unconsumed event through an index of the consumed ones
-- (durable.next_signal) instead of checking every event sent against every event of the
-- log; and the suspension records which attempt suspended the task, so that the daemon
-- that kept the suspended workflow in memory can tell whether anyone ran it since. And
-- ctx.continue_as_new ends a run and starts the next of a chain, with an empty log.

alter table durable.tasks add column suspend_token bigint;
alter table durable.tasks add column continued_from bigint;
alter table durable.tasks add column continued_as bigint;

create index events_signal_idx on durable.events (task_id, branch, name, signal_id)
    where signal_id is not null;

-- The oldest event named `event_name` sent to `task` that branch `br` has not consumed
-- yet. A branch's waits take a name's events oldest first, and send_event gives a task's
-- events their ids under the task's row lock, so in the order they commit: the consumed
-- ones are always the oldest, and the first unconsumed one is the first after the newest
-- consumed. Two index probes however long the log is (an anti-join against the branch's
-- events cost one probe per event ever sent). The newest consumed one is read as the
-- first row of an ordered scan, not as max(): on stale statistics the planner
-- aggregated every consumed event instead of reading one.
create function durable.next_signal(task bigint, br integer, event_name text)
returns bigint
language sql stable
set search_path = pg_catalog, pg_temp as $$
    select s.id from durable.signals s
     where s.task_id = task and s.name = event_name
       and s.id > coalesce((select e.signal_id from durable.events e
                             where e.task_id = task and e.branch = br
                               and e.name = event_name and e.signal_id is not null
                             order by e.signal_id desc
                             limit 1), 0)
     order by s.id
     limit 1
$$;

-- End a workflow's attempt to wait for children, a timer or an event. Returns 'waiting',
-- or 'queued' when what it waits for has already happened, or null when the claim token
-- no longer matches, or 'cancelled' when a cancel was requested while the attempt ran
-- (its notification came too late to stop it). Lock first, check in a later statement
-- (see wake_waiting).
create or replace function durable.suspend(
    task bigint, token bigint, br integer, children bigint[], wake timestamptz,
    event_name text
) returns text
language plpgsql
set search_path = pg_catalog, pg_temp as $$
declare
    ready boolean := false;
    cancelling boolean;
begin
    select t.cancel_requested into cancelling from durable.tasks t
     where t.id = task and t.claim_token = token and t.status = 'running' for update;
    if not found then
        return null;
    end if;
    if cancelling then
        -- Its descendants are cancelled by tasks_after_update (durable.cancel_descendants).
        update durable.tasks t
           set status = 'cancelled', finished_at = now(), wake_at = null, waiting_on = null,
               waiting_event = null, claim_token = null, lease_until = null, worker_id = null
         where t.id = task;
        return 'cancelled';
    end if;
    if children is not null then
        -- A child finishing now runs wake_waiting, which may still see this task running
        -- and not wake it; and the check below may not see that child's uncommitted
        -- finish. The lock wake_waiting takes too orders them: either the child committed
        -- before the check's snapshot, or it wakes the task after this commits. (An
        -- advisory lock, not the children's rows: row locks would deadlock with heartbeats.)
        perform pg_advisory_xact_lock(1685418593, (task % 2147483648)::integer);
        if not exists (
            select 1 from durable.tasks c
            where c.id = any(children) and c.status not in ('completed', 'failed', 'cancelled'))
        then
            ready := true;
        end if;
    end if;
    if event_name is not null and durable.next_signal(task, br, event_name) is not null then
        ready := true;
    end if;
    if wake is not null and wake <= now() then
        ready := true;
    end if;
    update durable.tasks t
       set status = case when ready then 'queued' else 'waiting' end,
           run_at = now(),
           wake_at = case when ready then null else wake end,
           waiting_on = case when ready then null else children end,
           waiting_event = case when ready then null else event_name end,
           claim_token = null, lease_until = null, worker_id = null, suspend_token = token
     where t.id = task;
    return case when ready then 'queued' else 'waiting' end;
end;
$$;

-- End a workflow's run and start its next one (ctx.continue_as_new): a new task of the
-- same name and options with arguments `new_args`/`new_kwargs` and an empty log, which
-- takes over the idempotency key; the run ends completed, `continued_as` the new one.
-- Returns the new task's id; null when the claim token no longer matches; 0 when a
-- cancel was requested while the run went on (it ends cancelled and nothing starts).
create function durable.continue_as_new(task bigint, token bigint, new_args jsonb,
                                        new_kwargs jsonb)
returns bigint
language plpgsql
set search_path = pg_catalog, pg_temp as $$
declare
    cur durable.tasks;
    next_id bigint;
begin
    select * into cur from durable.tasks t
     where t.id = task and t.claim_token = token and t.status = 'running' for update;
    if not found then
        return null;
    end if;
    if cur.cancel_requested then
        update durable.tasks t
           set status = 'cancelled', finished_at = now(), claim_token = null,
               lease_until = null, worker_id = null
         where t.id = task;
        return 0;
    end if;
    -- The key is unique: it leaves this run before the next one takes it.
    update durable.tasks t set idempotency_key = null where t.id = task;
    insert into durable.tasks (queue, name, kind, args, kwargs, priority, max_attempts,
                               timeout, idempotency_key, concurrency_key, key_limit,
                               key_rate_limit, key_rate_period, trace_context,
                               notify_finish, continued_from)
    values (cur.queue, cur.name, cur.kind, new_args, new_kwargs, cur.priority,
            coalesce(cur.attempt_budget, cur.max_attempts), cur.timeout,
            cur.idempotency_key, cur.concurrency_key, cur.key_limit, cur.key_rate_limit,
            cur.key_rate_period, cur.trace_context, cur.notify_finish, task)
    returning id into next_id;
    update durable.tasks t
       set status = 'completed', result = null, finished_at = now(), continued_as = next_id,
           claim_token = null, lease_until = null, worker_id = null
     where t.id = task;
    return next_id;
end;
$$;
