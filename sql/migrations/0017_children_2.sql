-- 0017: children, second round.
--
-- Each child's finish looked at every child its waiting parent waited on
-- (durable.wake_waiting): a fan-out of n children cost n index probes per finish, some
-- 50,000 blocks read per finish for 2,000 children. durable.suspend now counts the
-- unfinished ones into waiting_left and each finish counts it down; the siblings are read
-- when it reaches zero. Rows suspended before this migration have no count: their next
-- finish counts them.
--
-- durable.restart (retry) kept the pending event of a child asked to stop (it ends
-- cancelled), so a parent retried right after a cancel failed again with that child's
-- cancellation; and it read the children without waiting for one whose outcome was being
-- written, keeping a child that failed as the retry ran. It now locks the unfinished
-- children first and runs again those asked to stop.

alter table durable.tasks add column waiting_left integer;

drop function durable.wake_waiting(bigint[]);

create function durable.wake_waiting(ids bigint[], finished bigint[]) returns void
language plpgsql
set search_path = pg_catalog, pg_temp as $$
declare
    r record;
    left_ bigint;
begin
    perform pg_advisory_xact_lock(1685418593, (p % 2147483648)::integer)
       from unnest(ids) as p order by p;
    perform 1 from durable.tasks where id = any(ids) and status = 'waiting'
        order by id for update;
    for r in
        select p.id, p.waiting_on, p.waiting_left from durable.tasks p
         where p.id = any(ids) and p.status = 'waiting' and p.waiting_on is not null
         order by p.id
    loop
        left_ := r.waiting_left - (select count(*) from unnest(finished) as f
                                    where f = any(r.waiting_on));
        if left_ is null or left_ <= 0 then
            select count(*) into left_ from durable.tasks c
             where c.id = any(r.waiting_on)
               and c.status not in ('completed', 'failed', 'cancelled');
        end if;
        if left_ = 0 then
            update durable.tasks p
               set status = 'queued', run_at = now(), wake_at = null, waiting_on = null,
                   waiting_event = null, waiting_left = null
             where p.id = r.id;
        else
            update durable.tasks p set waiting_left = left_ where p.id = r.id;
        end if;
    end loop;
end;
$$;

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
        perform durable.wake_waiting(parents, children);
    end if;
    return null;
end;
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

create or replace function durable.restart(task bigint, mode text, at integer default null)
returns integer
language plpgsql
set search_path = pg_catalog, pg_temp as $$
declare
    cur record;
    new_branch integer;
    other bigint;
begin
    -- Its unfinished children's rows first (the order of durable.lock_trees), then its
    -- own; the statements after see a child's outcome that committed meanwhile. A child
    -- whose failure was being written as the parent was retried was read as running: its
    -- event stayed, and the retried parent failed again with the child's old error.
    perform 1 from durable.tasks c
     where c.parent_id = task and c.status in ('queued', 'running', 'waiting')
     order by c.id desc
       for update;
    select t.status, t.branch, t.error, t.continued_as, t.active_key into cur
      from durable.tasks t where t.id = task for update;
    if not found then
        raise exception 'no task %', task using errcode = 'P0002';
    end if;
    if cur.status not in ('completed', 'failed', 'cancelled') then
        raise exception 'task % is %: only a finished task can be restarted (cancel it first)',
            task, cur.status using errcode = '55000';
    end if;
    if cur.continued_as is not null then
        raise exception 'task % continued as task %: restart the last run of its chain',
            task, cur.continued_as using errcode = '55000';
    end if;
    -- An idempotency key of scope "active" names one unfinished task at a time.
    select o.id into other from durable.tasks o
     where o.active_key = cur.active_key and o.id <> task
       and o.status in ('queued', 'running', 'waiting');
    if found then
        raise exception 'task % has the idempotency key of task %, which has not finished: '
            'finish or cancel that one first', task, other using errcode = '55000';
    end if;
    if mode = 'retry' then
        new_branch := cur.branch;
        delete from durable.events e
         where e.task_id = task and e.branch = cur.branch
           -- (A step's failed tries and its backoff sleeps are named together.)
           and (((e.status = 'failed' or e.kind = 'sleep')
                 and e.seq in (select p::integer from jsonb_array_elements_text(
                                   cur.error -> 'replay' -> 'positions') as p)
                 and not exists (select 1 from durable.events x
                                  where x.task_id = task and x.branch = cur.branch
                                    and x.seq >= (cur.error -> 'replay' ->> 'at')::integer))
                -- (A child asked to stop ends cancelled, whatever its attempt does.)
                or (e.kind = 'child' and e.status = 'pending'
                    and not exists (select 1 from durable.tasks c
                                    where c.id = e.child_id and not c.cancel_requested
                                      and c.status not in ('failed', 'cancelled')))
                -- An error stored before errors named their positions: the last event,
                -- when it failed.
                or (cur.error -> 'replay' is null and e.status = 'failed'
                    and e.seq = (select max(x.seq) from durable.events x
                                  where x.task_id = task and x.branch = cur.branch)));
    elsif mode in ('replay', 'fork') then
        select greatest(coalesce(max(e.branch), 0), cur.branch) + 1 into new_branch
          from durable.events e where e.task_id = task;
        if mode = 'fork' then
            if at is null or at < 0 then
                raise exception 'fork needs a position >= 0' using errcode = '22023';
            end if;
            insert into durable.events
                (task_id, branch, seq, kind, name, digest, status, result, error, child_id,
                 signal_id, wake_at, attempt, started_at, finished_at)
            select e.task_id, new_branch, e.seq, e.kind, e.name, e.digest, e.status,
                   e.result, e.error, e.child_id, e.signal_id, e.wake_at, e.attempt,
                   e.started_at, e.finished_at
              from durable.events e
             where e.task_id = task and e.branch = cur.branch and e.seq < at;
        end if;
    else
        raise exception 'unknown restart mode %', mode using errcode = '22023';
    end if;
    -- A patch marker the log now ends with goes too: nothing recorded after it depends on
    -- its answer, and code from before the patch would step over it and record the old
    -- branch after it, a log no version of the code replays. The run asks again.
    delete from durable.events e
     where e.task_id = task and e.branch = new_branch and e.kind = 'patch'
       and not exists (select 1 from durable.events x
                        where x.task_id = task and x.branch = new_branch
                          and x.seq > e.seq and x.kind <> 'patch');
    update durable.tasks t
       set status = 'queued', run_at = now(), attempt = t.attempt + 1,
           attempt_budget = coalesce(t.attempt_budget, t.max_attempts),
           max_attempts = t.attempt + coalesce(t.attempt_budget, t.max_attempts),
           result = null, error = null,
           finished_at = null, branch = new_branch, cancel_requested = false,
           wake_at = null, waiting_on = null, waiting_event = null, worker_id = null,
           claim_token = null, lease_until = null,
           -- Run again, not started again: later debounced starts make a task of their own.
           debounce_key = null, debounce_until = null
     where t.id = task;
    return new_branch;
end;
$$;
