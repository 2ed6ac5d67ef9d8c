-- 0025: lock order between task trees, third round: a statement ending tasks cancelled.
--
-- An attempt that ends after a cancel was asked for ends cancelled, and the update
-- trigger then cancels the task's unfinished descendants, locking them children first
-- (durable.lock_trees). But the trigger runs after the statement has taken the task's own
-- row: its descendants, newer, were locked after it. A second cancel of the same tree
-- (newest first) that held a descendant and waited for the task's row deadlocked with the
-- statement, and Postgres failed one of them with DeadlockDetectedError. Every statement
-- that ends attempts now locks the unfinished descendants of its tasks asked to cancel
-- (durable.unfinished_descendants) with its rows, newest first; durable.suspend and
-- durable.continue_as_new lock the tree (durable.lock_trees) of a task asked to cancel
-- before its row; the reaper locks them before the expired rows, which it never waits
-- for. (The statements of sql/queries.sql that changed with it, complete, release, fail,
-- retry_later, mark_cancelled and reap_expired, need no migration.)

-- The unfinished descendants of `ids`. A task asked to cancel ends cancelled whatever
-- its attempt's outcome, and the update trigger then cancels its descendants: locked
-- there, after the statement ending it had taken its row, a descendant (newer) was taken
-- out of order (see durable.lock_trees), and a second cancel of the tree, holding the
-- descendant and waiting for the task's row, deadlocked with the statement. So every
-- statement that ends attempts locks these with its rows, newest first, for the tasks of
-- its rows asked to cancel. (A task whose cancel commits between the statement's snapshot
-- and its row's lock is left to the trigger.) Called only for those: a completion not
-- asked to cancel pays for the look at its own row alone.
create or replace function durable.unfinished_descendants(ids bigint[]) returns bigint[]
language sql stable
set search_path = pg_catalog, pg_temp as $$
    with recursive tree (id, status) as (
        select c.id, c.status from durable.tasks c where c.parent_id = any(ids)
        union
        select c.id, c.status from durable.tasks c join tree on c.parent_id = tree.id
    )
    select coalesce(array_agg(tree.id) filter (
                        where tree.status in ('queued', 'running', 'waiting')), '{}')
      from tree
$$;

create or replace function durable.suspend(
    task bigint, token bigint, br integer, children bigint[], wake timestamptz,
    event_name text
) returns text
language plpgsql
set search_path = pg_catalog, pg_temp as $$
declare
    ready boolean := false;
    cancelling boolean;
    due timestamptz;
    left_ integer;
begin
    -- Asked to cancel, it ends cancelled: its tree first (durable.unfinished_descendants).
    if (select t.cancel_requested from durable.tasks t
         where t.id = task and t.claim_token = token and t.status = 'running') then
        perform durable.lock_trees(array[task]);
    end if;
    select t.cancel_requested, t.deadline into cancelling, due from durable.tasks t
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
        -- Counted once here, counted down by each finish (see wake_waiting).
        select count(*) into left_ from durable.tasks c
         where c.id = any(children) and c.status not in ('completed', 'failed', 'cancelled');
        if left_ = 0 then
            ready := true;
        end if;
    end if;
    if event_name is not null and durable.next_signal(task, br, event_name) is not null then
        ready := true;
    end if;
    -- A deadline wakes the workflow too (its next claim fails it with DeadlineExceeded).
    wake := least(wake, due);
    if wake is not null and wake <= now() then
        ready := true;
    end if;
    update durable.tasks t
       set status = case when ready then 'queued' else 'waiting' end,
           run_at = now(),
           wake_at = case when ready then null else wake end,
           waiting_on = case when ready then null else children end,
           waiting_left = case when ready then null else left_ end,
           waiting_event = case when ready then null else event_name end,
           claim_token = null, lease_until = null, worker_id = null, suspend_token = token
     where t.id = task;
    return case when ready then 'queued' else 'waiting' end;
end;
$$;

create or replace function durable.continue_as_new(task bigint, token bigint, new_args jsonb,
                                        new_kwargs jsonb)
returns bigint
language plpgsql
set search_path = pg_catalog, pg_temp as $$
declare
    cur durable.tasks;
    next_id bigint;
begin
    -- Asked to cancel, it ends cancelled: its tree first (durable.unfinished_descendants).
    if (select t.cancel_requested from durable.tasks t
         where t.id = task and t.claim_token = token and t.status = 'running') then
        perform durable.lock_trees(array[task]);
    end if;
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
    -- The keys are unique: they leave this run before the next one takes them.
    update durable.tasks t set idempotency_key = null, active_key = null where t.id = task;
    insert into durable.tasks (queue, name, kind, args, kwargs, priority, max_attempts,
                               timeout, idempotency_key, active_key, concurrency_key,
                               key_limit, key_rate_limit, key_rate_period, trace_context,
                               notify_finish, continued_from, version, deadline, tags,
                               attributes)
    values (cur.queue, cur.name, cur.kind, new_args, new_kwargs, cur.priority,
            coalesce(cur.attempt_budget, cur.max_attempts), cur.timeout,
            cur.idempotency_key, cur.active_key, cur.concurrency_key, cur.key_limit,
            cur.key_rate_limit, cur.key_rate_period, cur.trace_context, cur.notify_finish,
            task, cur.version, cur.deadline, cur.tags, cur.attributes)
    returning id into next_id;
    -- Events sent to this run and not taken by it (send_event accepted them while it was
    -- the chain's current run) are the next run's too, in the order they were sent, with
    -- their idempotency keys: a producer that sends one again, to either run, delivers it
    -- once. No sender can add one meanwhile: send_event locks this row first, and then
    -- finds the run completed.
    insert into durable.signals (task_id, name, payload, created_at, idempotency_key)
    select next_id, s.name, s.payload, s.created_at, s.idempotency_key
      from durable.signals s
     where s.task_id = task
       -- Taken oldest first by name (see next_signal): the untaken ones of a name are
       -- those after the newest taken one.
       and s.id > coalesce((select e.signal_id from durable.events e
                             where e.task_id = task and e.branch = cur.branch
                               and e.name = s.name and e.signal_id is not null
                             order by e.signal_id desc
                             limit 1), 0)
     order by s.id;
    update durable.tasks t
       set status = 'completed', result = null, finished_at = now(), continued_as = next_id,
           claim_token = null, lease_until = null, worker_id = null
     where t.id = task;
    return next_id;
end;
$$;
