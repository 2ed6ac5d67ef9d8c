-- 0006: step policies and the rest of flow control.
-- - durable.restart also drops a step's backoff sleeps with its failed tries (a step run
--   with retry= takes one position per try, durable/steps.py);
-- - queues can be paused (`durable queues pause NAME`): durable.claim claims nothing from
--   a paused queue;
-- - send_event(..., idempotency_key): a retrying producer delivers once;
-- - idempotency keys of scope "active", unique only among unfinished tasks;
-- - durable.progress: the latest progress a running task reported;
-- - tasks.deadline: durable.claim returns it, durable.suspend wakes a workflow for it;
-- - debounced starts (tasks.debounce_key, debounce_until).
-- sql/schema.sql holds the same schema in one file to read; a test holds them equal.

alter table durable.queues add column paused boolean not null default false;

alter table durable.signals add column idempotency_key text;
create unique index signals_idempotency_idx on durable.signals (task_id, idempotency_key)
    where idempotency_key is not null;

alter table durable.tasks add column active_key text;
alter table durable.tasks add column deadline timestamptz;
alter table durable.tasks add column debounce_key text;
alter table durable.tasks add column debounce_until timestamptz;
create unique index tasks_active_key_idx on durable.tasks (active_key)
    where active_key is not null and status in ('queued', 'running', 'waiting');
create unique index tasks_debounce_idx on durable.tasks (debounce_key)
    where debounce_key is not null and status = 'queued';

-- The latest progress a running task reported (TaskContext.progress, ctx.progress): one
-- row per task, overwritten, so that a task reporting in a loop does not grow anything.
-- Kept apart from durable.tasks: a report neither writes a version of the task's row nor
-- runs its triggers. Gone with the task.
create table durable.progress (
    task_id     bigint primary key references durable.tasks (id) on delete cascade,
    value       jsonb,
    message     text,
    updated_at  timestamptz not null default now()
);

-- The new argument makes a new function: the old one goes, or a call with three
-- arguments would be ambiguous. (Like every durable function, the new one is executable by
-- the roles that have usage on the schema.)
drop function durable.send_event(bigint, text, jsonb);
create function durable.send_event(task_id bigint, name text, payload jsonb default null,
                                   idempotency_key text default null)
returns boolean
language plpgsql
set search_path = pg_catalog, pg_temp as $$
#variable_conflict use_column
declare
    st text;
begin
    if send_event.name is null or length(send_event.name) not between 1 and 200 then
        raise exception 'durable.send_event: name must be 1 to 200 characters, got %',
            coalesce(length(send_event.name) || ' characters', 'null') using errcode = '22023';
    end if;
    if send_event.idempotency_key is not null
       and octet_length(send_event.idempotency_key) not between 1 and 2000 then
        raise exception 'durable.send_event: idempotency_key must be 1 to 2000 bytes, got %',
            octet_length(send_event.idempotency_key) using errcode = '22023';
    end if;
    -- The row lock serialises every delivery to this task, so the key's check below sees
    -- a concurrent producer's committed delivery.
    select t.status into st from durable.tasks t where t.id = send_event.task_id for update;
    if st is null then
        return false;
    end if;
    if send_event.idempotency_key is not null and exists (
        select 1 from durable.signals s
         where s.task_id = send_event.task_id
           and s.idempotency_key = send_event.idempotency_key) then
        return true;  -- delivered before, even if the task has finished since
    end if;
    if st in ('completed', 'failed', 'cancelled') then
        return false;
    end if;
    insert into durable.signals (task_id, name, payload, idempotency_key)
        values (send_event.task_id, send_event.name, send_event.payload,
                send_event.idempotency_key);
    update durable.tasks t
       set status = 'queued', run_at = now(), wake_at = null, waiting_event = null
     where t.id = send_event.task_id and t.status = 'waiting'
       and t.waiting_event = send_event.name;
    return true;
end;
$$;

create or replace function durable.restart(task bigint, mode text, at integer default null)
returns integer
language plpgsql
set search_path = pg_catalog, pg_temp as $$
declare
    cur record;
    new_branch integer;
begin
    select t.status, t.branch, t.error into cur from durable.tasks t where t.id = task for update;
    if not found then
        raise exception 'no task %', task using errcode = 'P0002';
    end if;
    if cur.status not in ('completed', 'failed', 'cancelled') then
        raise exception 'task % is %: only a finished task can be restarted (cancel it first)',
            task, cur.status using errcode = '55000';
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
                or (e.kind = 'child' and e.status = 'pending'
                    and exists (select 1 from durable.tasks c
                                where c.id = e.child_id and c.status in ('failed', 'cancelled')))
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
    update durable.tasks t
       set status = 'queued', run_at = now(), attempt = t.attempt + 1,
           attempt_budget = coalesce(t.attempt_budget, t.max_attempts),
           max_attempts = t.attempt + coalesce(t.attempt_budget, t.max_attempts),
           result = null, error = null,
           finished_at = null, branch = new_branch, cancel_requested = false,
           wake_at = null, waiting_on = null, waiting_event = null, worker_id = null,
           claim_token = null, lease_until = null
     where t.id = task;
    return new_branch;
end;
$$;

-- A new column in its result: the function goes and comes back.
drop function durable.claim(text, text[], integer, double precision, uuid);
create function durable.claim(q text, names text[], n integer, lease double precision,
                              worker uuid)
returns table (id bigint, queue text, name text, kind text, args text, kwargs text,
               attempt integer, max_attempts integer, timeout double precision,
               claim_token bigint, branch integer, parent_id bigint, root_id bigint,
               cancel_requested boolean, fresh boolean, deadline timestamptz)
language plpgsql
set search_path = pg_catalog, pg_temp as $$
#variable_conflict use_column
declare
    conc integer;
    rate integer;
    period double precision;
    keyed boolean;
    busy integer;
    claimed integer := 0;
    level integer;
    paused boolean;
begin
    perform set_config('synchronous_commit', 'off', true);  -- for this transaction only
    -- Scalars, not a record: a record with a null field is neither null nor not null.
    -- One statement reads the queue's limits, whether it is paused, and whether keyed
    -- tasks wait in it.
    select c.concurrency, c.rate_limit, c.rate_period, c.paused,
           exists (select 1 from durable.tasks t
                    where t.queue = q and t.status = 'queued' and t.concurrency_key is not null)
      into conc, rate, period, paused, keyed
      from (values (1)) as one left join durable.queues c on c.name = q;
    if paused then  -- `durable queues pause`: claims nothing until resumed
        return;
    end if;
    -- A period past any timestamp's range (a row written by hand) means "per forever":
    -- clamped to 30 years rather than failing every claim of the queue.
    period := least(period, 946080000);
    -- A transaction-level advisory lock: it serialises this queue's claimers without
    -- writing to any row.
    if conc is not null or rate is not null then
        perform pg_advisory_xact_lock(hashtextextended('durable.queue:' || q, 0));
    end if;
    if keyed then
        -- A key's limits count its running tasks in every queue, so the claimers of
        -- keyed tasks serialise across queues: one lock for all of them, always taken
        -- after the queue's own (the order rules out a deadlock between the two).
        perform pg_advisory_xact_lock(hashtextextended('durable.keys', 0));
    end if;
    if conc is not null or rate is not null or keyed then
        -- Paused while this claim waited for a lock above: the flag is read again in this
        -- later statement's snapshot. (An unlimited queue's claim takes no lock and
        -- skips this statement.)
        if exists (select 1 from durable.queues c where c.name = q and c.paused) then
            return;
        end if;
    end if;
    if conc is not null then
        select count(*) into busy from durable.tasks t where t.queue = q and t.status = 'running';
        n := least(n, conc - busy);
    end if;
    if rate is not null then
        delete from durable.rate_log r
         where r.bucket = 'q:' || q and r.at <= now() - make_interval(secs => period);
        select count(*) into busy from durable.rate_log r where r.bucket = 'q:' || q;
        n := least(n, rate - busy);
    end if;
    if n <= 0 then
        return;
    end if;
    if not keyed then
        -- The plain claim (unlimited queues take no lock), within any count above: one
        -- priority level at a time, highest first. Within a level tasks_ready_idx holds
        -- them in due order, so the scan ends at the first task not yet due, and tasks
        -- scheduled for later cost nothing however many wait.
        perform set_config('durable.claiming', 'on', true);  -- see tasks_after_update
        level := (select max(t.priority) from durable.tasks t
                   where t.queue = q and t.status = 'queued');
        while level is not null loop
            return query
            with ready as (
                -- Keyed tasks only under the keys' lock, by the branch below: one
                -- committed after the first statement looked would escape its limits.
                select t.id, t.started_at from durable.tasks t
                where t.queue = q and t.status = 'queued' and t.priority = level
                  and t.run_at <= now() and t.name = any(names)
                  -- A versioned task only where this daemon has its version: `names`
                  -- holds name || chr(31) || version for each versioned definition. An
                  -- unversioned task pays one null test.
                  and (t.version is null or t.name || chr(31) || t.version = any(names))
                  and t.concurrency_key is null
                order by t.run_at, t.id
                limit n - claimed
                for update skip locked
            )
            update durable.tasks t
               set status = 'running', claim_token = durable.new_token(),
                   lease_until = now() + make_interval(secs => lease), worker_id = worker,
                   started_at = coalesce(t.started_at, now())
              from ready
             where t.id = ready.id
            -- The domains' values go out as their base types (RETURN QUERY wants exactly
            -- the declared types).
            returning t.id, t.queue::text, t.name::text, t.kind::text, t.args::text,
                      t.kwargs::text, t.attempt::integer, t.max_attempts::integer,
                      t.timeout::double precision, t.claim_token, t.branch, t.parent_id,
                      t.root_id, t.cancel_requested, ready.started_at is null, t.deadline;
            get diagnostics busy = row_count;  -- the rows RETURN QUERY returned
            claimed := claimed + busy;
            exit when claimed >= n;
            level := (select max(t.priority) from durable.tasks t
                       where t.queue = q and t.status = 'queued' and t.priority < level);
        end loop;
        perform set_config('durable.claiming', '', true);
        if rate is not null and claimed > 0 then
            insert into durable.rate_log (bucket, at)
                select 'q:' || q, now() from generate_series(1, claimed);
        end if;
        return;
    end if;

    perform set_config('durable.claiming', 'on', true);
    return query
    with keys as (
        select k.concurrency_key as key,
               (select count(*) from durable.tasks r
                 where r.status = 'running' and r.concurrency_key = k.concurrency_key) as running,
               (select count(*) from durable.rate_log l
                 where l.bucket = 'k:' || k.concurrency_key
                   and l.at > now() - make_interval(
                                         secs => least(k.key_rate_period, 946080000))) as recent,
               k.key_limit, k.key_rate_limit
          from (select distinct on (t.concurrency_key) t.concurrency_key, t.key_limit,
                       t.key_rate_limit, t.key_rate_period
                  from durable.tasks t
                 where t.queue = q and t.status = 'queued' and t.concurrency_key is not null
                 order by t.concurrency_key, t.id desc) k
    ), ranked as (
        select t.id, t.priority, t.run_at, t.concurrency_key,
               row_number() over (partition by t.concurrency_key
                                  order by t.priority desc, t.run_at, t.id) as rn
          from durable.tasks t
         where t.queue = q and t.status = 'queued' and t.run_at <= now()
           and t.name = any(names)
           -- A versioned task only where this daemon has its version: `names`
           -- holds name || chr(31) || version for each versioned definition. An
           -- unversioned task pays one null test.
           and (t.version is null or t.name || chr(31) || t.version = any(names))
    ), chosen as (
        select r.id from ranked r left join keys k on k.key = r.concurrency_key
         where r.concurrency_key is null
            or (r.rn + k.running <= coalesce(k.key_limit, 2147483647)
                and r.rn + k.recent <= coalesce(k.key_rate_limit, 2147483647))
         order by r.priority desc, r.run_at, r.id
         limit n
    ), ready as (
        -- The status again, on the locked row: a row that another claim or a
        -- cancel changed after this statement's snapshot is re-checked by these conditions
        -- once its lock is granted, and the join's alone would let it through.
        select t.id, t.started_at from durable.tasks t join chosen using (id)
         where t.status = 'queued'
         for update of t skip locked
    ), started as (
        update durable.tasks t
           set status = 'running', claim_token = durable.new_token(),
               lease_until = now() + make_interval(secs => lease), worker_id = worker,
               started_at = coalesce(t.started_at, now())
          from ready
         where t.id = ready.id
        returning t.*, ready.started_at is null as fresh
    ), logged as (
        insert into durable.rate_log (bucket, at)
        select 'q:' || q, now() from started where rate is not null
        union all
        select 'k:' || s.concurrency_key, now() from started s
         where s.concurrency_key is not null and s.key_rate_limit is not null
    )
    select s.id, s.queue::text, s.name::text, s.kind::text, s.args::text, s.kwargs::text,
           s.attempt::integer, s.max_attempts::integer, s.timeout::double precision,
           s.claim_token, s.branch, s.parent_id, s.root_id, s.cancel_requested, s.fresh,
           s.deadline
      from started s;
    perform set_config('durable.claiming', '', true);
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
           waiting_event = case when ready then null else event_name end,
           claim_token = null, lease_until = null, worker_id = null, suspend_token = token
     where t.id = task;
    return case when ready then 'queued' else 'waiting' end;
end;
$$;
