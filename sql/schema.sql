-- The durable schema as it stands: what the migrations in sql/migrations/ build, in one
-- file to read. `durable sql` prints it; `durable migrate` applies the migrations.
-- tests/integration/test_migrations.py holds both to the same catalog.

create schema if not exists durable;

create table durable.migrations (
    version     integer primary key,
    name        text not null,
    applied_at  timestamptz not null default now()
);

-- Every claim draws a fresh token; writes for a task are fenced on it. 62 random bits, not
-- a sequence: claims commit asynchronously (see durable.claim), and a sequence can hand a
-- value out again when a crash loses the WAL that advanced it.
--
-- The one function that does not pin its search_path: it runs once per claimed row, and
-- a SET clause would stop the planner from inlining it (about fifteen times slower).
-- Instead its body names every function and operator with its schema, so that no
-- search_path can change what it calls (tests/integration/test_search_path.py checks).
create function durable.new_token() returns bigint
language sql volatile parallel safe as $$
    select ((pg_catalog.random() operator(pg_catalog.*) 2147483648::double precision)::bigint
            operator(pg_catalog.<<) 31)
           operator(pg_catalog.#)
           (pg_catalog.random() operator(pg_catalog.*) 2147483648::double precision)::bigint
$$;

-- The checks on one column of durable.tasks are domains, not table constraints. A table's CHECK constraints are all
-- evaluated on every row an UPDATE writes, and compiled for every statement; a domain's
-- check only where a value of its type is written, compiled with the statement's plan.
create domain durable.task_status as text
    constraint task_status_check
    check (value in ('queued', 'running', 'waiting', 'completed', 'failed', 'cancelled'));
create domain durable.task_kind as text
    constraint task_kind_check check (value in ('task', 'workflow'));
create domain durable.label as text
    constraint label_check check (length(value) between 1 and 200);
create domain durable.positive_int as integer
    constraint positive_int_check check (value >= 1);
create domain durable.positive_seconds as double precision
    constraint positive_seconds_check check (value > 0);

create table durable.tasks (
    id              bigint generated always as identity primary key,
    queue           durable.label not null,
    name            durable.label not null,
    kind            durable.task_kind not null default 'task',
    args            jsonb not null default '[]',
    kwargs          jsonb not null default '{}',
    status          durable.task_status not null default 'queued',
    priority        integer not null default 0,
    run_at          timestamptz not null default now(),
    attempt         durable.positive_int not null default 1,
    max_attempts    durable.positive_int not null default 3,
    timeout         durable.positive_seconds,
    lease_until     timestamptz,
    claim_token     bigint,
    worker_id       uuid,
    result          jsonb,
    error           jsonb,
    idempotency_key text,
    -- No foreign key: its check would run for every task inserted, queued and fired per
    -- row even when null (about a tenth of a bulk insert's server time). A child is
    -- inserted only in its running parent's fenced transaction, which locks the parent's
    -- row before it commits; tasks_after_delete clears the reference when the parent goes.
    parent_id       bigint,
    root_id         bigint,
    branch          integer not null default 0,
    wake_at         timestamptz,
    waiting_on      bigint[],
    waiting_event   text,
    cancel_requested boolean not null default false,
    notify_finish   boolean not null default false,
    concurrency_key text,
    key_limit       durable.positive_int,
    key_rate_limit  durable.positive_int,
    key_rate_period durable.positive_seconds,
    created_at      timestamptz not null default now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    -- The starter's trace context ({"traceparent": ...}).
    trace_context   jsonb,
    -- The attempts the task was started with, kept by its first restart (until
    -- then max_attempts holds it); each restart grants that many again. Keep new columns
    -- last, as the migrations add them.
    attempt_budget  integer,
    -- The version of the code the task started on (null: unversioned). Only daemons that
    -- have that version's code claim it (durable.claim).
    version         text,
    -- The claim token of the attempt that last suspended the task, kept while no other
    -- attempt ran it since (a daemon that kept the suspended workflow in memory resumes
    -- it only when this is its own token; see durable.sticky).
    suspend_token   bigint,
    -- A chain of runs (ctx.continue_as_new): the run this one continues, and the run
    -- that continued this one.
    continued_from  bigint,
    continued_as    bigint,
    -- An idempotency key of scope "active": unique only among unfinished tasks.
    active_key      text,
    -- The task must be done by then (deadline=): it fails with DeadlineExceeded, across
    -- attempts, suspensions and restarts; a waiting workflow is woken for it.
    deadline        timestamptz,
    -- start(..., debounce=): a later start with the same key, while this one is still
    -- queued, replaces its arguments and options and pushes its run_at, never past
    -- debounce_until (the earliest bound any of its starts' max_delay set).
    debounce_key    text,
    debounce_until  timestamptz,
    -- Labels to search by (client.start(tags=, attributes=), durable.tag): null when none.
    tags            text[],
    attributes      jsonb,
    -- How many of waiting_on had not finished when the workflow suspended, less one for
    -- each of its children that finished since (durable.wake_waiting): a finishing child
    -- checks its siblings only once this reaches zero. Null: count at every finish.
    waiting_left    integer,
    -- A rate limit and its period come together. The checks on one column are the
    -- domains' (above): they run only where a value is written.
    constraint tasks_key_check check ((key_rate_limit is null) = (key_rate_period is null)),
    constraint tasks_running_check
        check (status <> 'running' or (claim_token is not null and lease_until is not null)),
    -- A claim token is held exactly while the task runs; batch writes fence on it.
    constraint tasks_claim_check check ((status = 'running') = (claim_token is not null))
);

-- Queued work by priority, then due time. Finished history does not slow the claim, nor
-- do tasks scheduled for later (within a level they follow the due ones). Priorities
-- ascend: a claim finds the highest level reading backwards from the newest entry,
-- not past the dead entries of claimed tasks that gather at the start of each level
-- until VACUUM removes them.
create index tasks_ready_idx on durable.tasks (queue, priority, run_at, id)
    where status = 'queued';
-- Running tasks: counted per queue under a fleet-wide limit; expired leases for the reaper.
create index tasks_running_idx on durable.tasks (queue, lease_until) where status = 'running';
-- Suspended workflows with a timer (sleep or event timeout).
create index tasks_wake_idx on durable.tasks (wake_at) where status = 'waiting';
create index tasks_parent_idx on durable.tasks (parent_id) where parent_id is not null;
-- A workflow tree by its root: prune deletes a tree only once all of it has finished.
create index tasks_root_idx on durable.tasks (root_id) where root_id is not null;
create unique index tasks_idempotency_idx on durable.tasks (idempotency_key)
    where idempotency_key is not null;
-- Tags and attributes, searched by the task list; only the rows that have some are indexed.
create index tasks_tags_idx on durable.tasks using gin (tags) where tags is not null;
create index tasks_attributes_idx on durable.tasks using gin (attributes jsonb_path_ops)
    where attributes is not null;
-- Finished tasks by when they finished: the dashboard's throughput over the last hour.
create index tasks_finished_idx on durable.tasks (finished_at) where finished_at is not null;
-- Tasks not yet running whose deadline will pass: the timer loop fails them when it does.
create index tasks_deadline_idx on durable.tasks (deadline)
    where deadline is not null and status in ('queued', 'waiting');
-- Rows without an active key never enter it; a task leaves it when it finishes, which
-- frees its key (status changes already update every index: no HOT update is lost).
create unique index tasks_active_key_idx on durable.tasks (active_key)
    where active_key is not null and status in ('queued', 'running', 'waiting');
-- The pending start of a debounce key: only while it is queued (a claimed one is left
-- alone, and the next start makes a new task).
create unique index tasks_debounce_idx on durable.tasks (debounce_key)
    where debounce_key is not null and status = 'queued';

create table durable.workers (
    id              uuid primary key,
    host            text not null,
    pid             integer not null,
    queues          jsonb not null,
    names           text[] not null default '{}',
    started_at      timestamptz not null default now(),
    heartbeat_at    timestamptz not null default now(),
    stopped_at      timestamptz
);

-- The catalog: what the daemons serve. Each daemon publishes its definitions when it
-- starts and again with every heartbeat; a row is written only when it changed. The
-- newest daemon's publication wins (see publish_definitions in queries.sql): a rolling
-- deploy moves every name to the new code's options as its first daemon starts, and a
-- name whose newest publisher died goes back to a live one's at that one's next beat.
-- A row stays after every daemon serving it has gone: a name published once is known,
-- and a task started by it waits, visibly, for a daemon that has its code.
create table durable.definitions (
    name            text primary key,
    kind            text not null,
    queue           text not null,
    max_attempts    integer not null,
    timeout         double precision,
    priority        integer not null,
    retry           jsonb not null,
    -- Whether the code computes a concurrency key from the arguments (a start without
    -- the code must then be given the key).
    keyed           boolean not null,
    key_limit       integer,
    key_rate_limit  integer,
    key_rate_period double precision,
    version         text,
    digest          text not null,
    published_by    uuid not null,
    published_at    timestamptz not null default now(),
    -- The definition's deadline (seconds from a start) and idempotency scope, which a
    -- start by name applies as a start with the code does.
    deadline        double precision,
    idempotency     text not null default 'forever',
    constraint definitions_name_check check (
        length(name) between 1 and 200 and length(queue) between 1 and 200),
    constraint definitions_kind_check check (kind in ('task', 'workflow')),
    constraint definitions_attempts_check check (max_attempts >= 1),
    constraint definitions_version_check check (version is null or length(version) between 1 and 100),
    constraint definitions_deadline_check check (deadline > 0),
    constraint definitions_idempotency_check check (idempotency in ('forever', 'active'))
);

-- What each daemon serves, as it published it (its code does not change while it runs).
-- A daemon counts as live by its durable.workers row's heartbeat; its rows go with it.
create table durable.worker_definitions (
    worker_id   uuid not null references durable.workers (id) on delete cascade,
    name        text not null,
    version     text,
    digest      text not null,
    -- kind, queue and defaults, as in durable.definitions: `durable definitions` compares
    -- them across the live daemons.
    spec        jsonb not null,
    primary key (worker_id, name)
);

-- The event log of workflows: one row per durable operation, by (task, branch, seq).
-- No foreign key to durable.tasks: every statement that writes events holds the
-- task's row locked, so the row cannot go away first, and a per-row check of the key
-- cost close to half of a checkpoint statement's server time; a deleted task's events go
-- with it (tasks_delete_events).
create table durable.events (
    task_id     bigint not null,
    branch      integer not null,
    seq         integer not null,
    kind        text not null,
    name        text not null,
    digest      text not null,
    status      text not null,
    result      jsonb,
    error       jsonb,
    child_id    bigint,
    signal_id   bigint,
    wake_at     timestamptz,
    attempt     integer not null,
    started_at  timestamptz not null default now(),
    finished_at timestamptz,
    primary key (task_id, branch, seq),
    constraint events_kind_check
        check (kind in ('step', 'transaction', 'child', 'sleep', 'event', 'memo', 'patch')),
    constraint events_status_check check (status in ('pending', 'completed', 'failed'))
);

create index events_child_idx on durable.events (child_id) where child_id is not null;
-- The events a branch's waits consumed, by name: the newest one tells a wait where the
-- unconsumed events start, whatever the length of the log (durable.next_signal).
create index events_signal_idx on durable.events (task_id, branch, name, signal_id)
    where signal_id is not null;

-- One step's checkpoint as the daemon sends it: a flush passes an array of these (in the
-- field order of durable.models.Checkpoint), one parameter instead of one per column.
create type durable.checkpoint_row as (
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
    started_at  timestamptz,
    wake_at     timestamptz
);

-- The same, with its times as seconds since the epoch (what the daemon sends): a
-- timestamptz parameter costs more to encode than the rest of the row together, a double
-- precision next to nothing. durable.checkpoint_row stays for daemons of the previous
-- release during a rolling deploy.
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

-- Events sent to workflows (client.send_event / durable.send_event), kept until consumed.
create table durable.signals (
    id          bigint generated always as identity primary key,
    task_id     bigint not null references durable.tasks (id) on delete cascade,
    name        text not null,
    payload     jsonb,
    created_at  timestamptz not null default now(),
    -- send_event(..., idempotency_key): a producer that retries delivers once per task.
    idempotency_key text
);

create index signals_task_idx on durable.signals (task_id, name, id);
create unique index signals_idempotency_idx on durable.signals (task_id, idempotency_key)
    where idempotency_key is not null;

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

-- NOTIFY `durable_ready` (payload: the queue) once per queue per statement when work
-- is ready; `durable_done` (payload: the id) when a task someone awaits finishes;
-- and wake the parents of finished children. Never on heartbeats or acknowledgements.
create function durable.tasks_after_insert() returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp as $$
begin
    -- One statement (no loop): a repeat of a (channel, payload) pair is delivered once.
    perform pg_notify('durable_ready', r.queue)
       from (select distinct n.queue from new_rows n where n.status = 'queued') r;
    return null;
end;
$$;

create function durable.tasks_after_update() returns trigger
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

-- Requeue the given waiting workflows whose children are all finished; `finished` are the
-- children that finished in the calling statement. The row lock is taken first, in id
-- order, and the check runs in a later statement: under READ COMMITTED that statement's
-- snapshot sees every sibling that finished before the lock was granted, so two children
-- finishing at once cannot both miss the wake-up. A parent that is still running (about
-- to suspend) has no such row lock to take: the advisory lock, which durable.suspend
-- takes too, orders the two (see there).
-- A finish counts down its parent's waiting_left under that row lock, and the siblings
-- are read only when it reaches zero: a fan-out of n children costs each finish no
-- sibling's row, where a look at them all made the fan-out quadratic. Each child of the
-- parent that finished counts, without looking whether waiting_on holds it: that look
-- read the whole array (a toasted value, read again for every child finishing) and
-- scanned it, O(n) per finish. So the count can fall short of the children still
-- awaited (a child finishing that the parent does not wait for, one restarted and finished
-- twice): the look at zero then finds some unfinished, counts them, and keeps only those
-- in waiting_on, so it costs as much as the finishes that brought the count down since
-- the last look. It cannot run over: each child counted unfinished by durable.suspend or
-- by a look counts down when it finishes, after it.
create function durable.wake_waiting(ids bigint[], finished bigint[]) returns void
language plpgsql
set search_path = pg_catalog, pg_temp as $$
declare
    r record;
    left_ bigint;
    awaited bigint[];
    unfinished bigint[];
begin
    perform pg_advisory_xact_lock(1685418593, (p % 2147483648)::integer)
       from unnest(ids) as p order by p;
    perform 1 from durable.tasks where id = any(ids) and status = 'waiting'
        order by id for update;
    for r in
        -- With one parent (the usual statement), every finished child is its own.
        select p.id, p.waiting_left - case when cardinality(ids) = 1
                                           then cardinality(finished) else f.n end as left_
          from durable.tasks p
          left join (select c.parent_id, count(*) as n from durable.tasks c
                      where cardinality(ids) > 1 and c.id = any(finished)
                      group by c.parent_id) f on f.parent_id = p.id
         where p.id = any(ids) and p.status = 'waiting' and p.waiting_on is not null
         order by p.id
    loop
        left_ := r.left_;
        unfinished := null;
        if left_ is null or left_ <= 0 then
            -- The array read once, into a variable: used in place, a toasted value is
            -- fetched again at each use.
            select p.waiting_on into awaited from durable.tasks p where p.id = r.id;
            select coalesce(array_agg(c.id order by c.id), '{}') into unfinished
              from durable.tasks c
             where c.id = any(awaited) and c.status not in ('completed', 'failed', 'cancelled');
            left_ := cardinality(unfinished);
        end if;
        if left_ = 0 then
            update durable.tasks p
               set status = 'queued', run_at = now(), wake_at = null, waiting_on = null,
                   waiting_event = null, waiting_left = null
             where p.id = r.id;
        elsif cardinality(unfinished) < cardinality(awaited) then
            update durable.tasks p set waiting_left = left_, waiting_on = unfinished
             where p.id = r.id;
        else
            update durable.tasks p set waiting_left = left_ where p.id = r.id;
        end if;
    end loop;
end;
$$;

-- Lock the rows of `ids` and of their unfinished descendants, newest first. A task is
-- newer than its parent, so a child's row is taken before its parent's: the order a
-- finishing child takes them in (its own row, then, in durable.wake_waiting, its waiting
-- parent's). A cancel that took the parent's row first and then waited for a finishing
-- child's, while the child waited for the parent's, was a deadlock Postgres broke by
-- failing one of them. Any two callers take rows in the same order: they cannot deadlock.
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

-- The unfinished descendants of `ids`. A task asked to cancel ends cancelled whatever
-- its attempt's outcome, and the update trigger then cancels its descendants: locked
-- there, after the statement ending it had taken its row, a descendant (newer) was taken
-- out of order (see durable.lock_trees), and a second cancel of the tree, holding the
-- descendant and waiting for the task's row, deadlocked with the statement. So every
-- statement that ends attempts locks these with its rows, newest first, for the tasks of
-- its rows asked to cancel. (A task whose cancel commits between the statement's snapshot
-- and its row's lock is left to the trigger.) Called only for those: a completion not
-- asked to cancel pays for the look at its own row alone.
create function durable.unfinished_descendants(ids bigint[]) returns bigint[]
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

-- The cascade of a cancel, written once. Every unfinished descendant of `parents`
-- is cancelled: queued and waiting ones end now; a running one is asked to stop (its
-- daemon hears of it on `durable_control`, or from its next heartbeat) and ends cancelled
-- whatever its attempt's outcome. Returns each task reached, with its status after.
create function durable.cancel_descendants(parents bigint[])
returns table (id bigint, status text)
language plpgsql
set search_path = pg_catalog, pg_temp as $$
#variable_conflict use_column
declare
    outer_cascade text := current_setting('durable.cascading', true);
    r record;
begin
    -- The updates below end tasks cancelled: their own trigger pass must not cascade
    -- again, this statement already reaches the whole tree.
    perform set_config('durable.cascading', 'on', true);
    for r in
        with recursive tree as (
            select c.id from durable.tasks c where c.parent_id = any(parents)
            union
            select c.id from durable.tasks c join tree on c.parent_id = tree.id
        )
        update durable.tasks t
           set cancel_requested = true,
               status = case when t.status = 'running' then 'running' else 'cancelled' end,
               finished_at = case when t.status = 'running' then null else now() end,
               wake_at = null, waiting_on = null, waiting_event = null
          from tree
         where t.id = tree.id and t.status in ('queued', 'running', 'waiting')
        returning t.id, t.status::text as status
    loop
        if r.status = 'running' then
            perform pg_notify('durable_control', 'cancel:' || r.id);
        end if;
        id := r.id;
        status := r.status;
        return next;
    end loop;
    perform set_config('durable.cascading', coalesce(outer_cascade, ''), true);
end;
$$;

-- Cancel tasks and their unfinished descendants. Returns a row for each task
-- reached: `status` is 'cancelled' for one that ended now, 'running' for one asked to
-- stop (it ends cancelled, whatever its attempt's outcome: every statement that writes an
-- outcome reads cancel_requested), and for a task of `ids` that had already finished, its
-- final status with `already_finished`.
create function durable.cancel(ids bigint[])
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

create trigger tasks_notify_insert after insert on durable.tasks
    referencing new table as new_rows
    for each statement execute function durable.tasks_after_insert();

create trigger tasks_notify_update after update on durable.tasks
    referencing new table as new_rows
    for each statement execute function durable.tasks_after_update();

-- A deleted task's events go with it, and its children lose their parent (what foreign
-- keys' ON DELETE CASCADE and SET NULL would do row by row).
create function durable.tasks_after_delete() returns trigger
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

create trigger tasks_delete_events after delete on durable.tasks
    referencing old table as old_rows
    for each statement execute function durable.tasks_after_delete();

-- Work that becomes ready (requeued, woken, retried, rescheduled): the WHEN clause is
-- checked in the executor, so claims and completions never call the function, and a
-- repeated (channel, payload) within a transaction is delivered once.
create function durable.notify_ready() returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp as $$
begin
    perform pg_notify('durable_ready', new.queue);
    return null;
end;
$$;

create trigger tasks_notify_ready after update on durable.tasks
    for each row
    when (new.status = 'queued' and (old.status <> 'queued' or old.run_at <> new.run_at))
    execute function durable.notify_ready();

-- Refuse a payload (a task's arguments, an event's) over 16 MiB as JSON, as a client
-- refuses it (codec.MAX_PAYLOAD), in one line naming the function and the field. It is
-- measured as the client measures it: JSON with no space after `,` and `:`, where jsonb's
-- text has one after each. A payload whose jsonb text is within the limit passes at once,
-- and one still over it with every ", " and ": " of that text discounted (those inside
-- strings too) is refused at once; only between the two are the spaces outside strings
-- counted exactly, by a regular expression (seconds for 16 MB).
create function durable.check_payload(caller text, field text, value jsonb) returns void
language plpgsql immutable
set search_path = pg_catalog, pg_temp as $$
declare
    max_bytes constant bigint := 16777216;
    quoted constant text := '"(?:[^"\\]|\\.)*"';
    t text;
    n bigint;
    least_n bigint;
begin
    if value is null then
        return;
    end if;
    t := value::text;
    n := octet_length(t);
    if n <= max_bytes then
        return;
    end if;
    least_n := n - (n - octet_length(replace(replace(t, ', ', ''), ': ', ''))) / 2;
    if least_n > max_bytes then
        raise exception '%: % is at least % bytes as JSON; the limit is % bytes',
            caller, field, least_n, max_bytes using errcode = '22023';
    end if;
    n := n - (regexp_count(t, quoted || '|[,:] ') - regexp_count(t, quoted));
    if n > max_bytes then
        raise exception '%: % is % bytes as JSON; the limit is % bytes',
            caller, field, n, max_bytes using errcode = '22023';
    end if;
end;
$$;

-- Enqueue from SQL, inside the caller's transaction (a transactional outbox). The name is
-- resolved through the catalog (durable.definitions): the task gets its definition's
-- kind, queue, defaults and version, and the arguments given here override them. A name
-- no daemon ever published is refused unless a queue is given or allow_unknown is true.
-- deadline (seconds from now), idempotency ('forever' or 'active') and debounce,
-- debounce_key, max_delay mean what they mean to client.start. args and kwargs over
-- 16 MiB are refused, as by a client (durable.check_payload).
create function durable.start(
    name text,
    args jsonb default '[]',
    kwargs jsonb default '{}',
    queue text default null,
    priority integer default null,
    run_at timestamptz default null,
    max_attempts integer default null,
    timeout double precision default null,
    idempotency_key text default null,
    kind text default null,
    concurrency_key text default null,
    key_limit integer default null,
    allow_unknown boolean default false,
    deadline double precision default null,
    idempotency text default null,
    debounce double precision default null,
    debounce_key text default null,
    max_delay double precision default null
) returns bigint
language plpgsql
set search_path = pg_catalog, pg_temp as $$
#variable_conflict use_column
declare
    new_id bigint;
    d durable.definitions%rowtype;
    rate_limit integer;
    rate_period double precision;
    bounce_key text;
begin
    if jsonb_typeof(args) is distinct from 'array' then
        raise exception 'durable.start: args must be a JSON array, not %', jsonb_typeof(args)
            using errcode = '22023';
    end if;
    if jsonb_typeof(kwargs) is distinct from 'object' then
        raise exception 'durable.start: kwargs must be a JSON object, not %', jsonb_typeof(kwargs)
            using errcode = '22023';
    end if;
    perform durable.check_payload('durable.start', 'args', start.args);
    perform durable.check_payload('durable.start', 'kwargs', start.kwargs);
    -- Refused here, in one line naming the argument, rather than by a column's check or
    -- an index deep in the insert (or, for a NaN timeout, by nothing at all).
    if start.name is null or length(start.name) not between 1 and 200 then
        raise exception 'durable.start: name must be 1 to 200 characters, got %',
            coalesce(length(start.name) || ' characters', 'null') using errcode = '22023';
    end if;
    select * into d from durable.definitions c where c.name = start.name;
    if not found then
        if start.queue is null and not coalesce(start.allow_unknown, false) then
            raise exception 'durable.start: no daemon has published a definition named %; '
                'pass queue => ... or allow_unknown => true to start it anyway',
                left(to_json(start.name)::text, 200) using errcode = '22023';
        end if;
    elsif d.keyed and start.concurrency_key is null then
        raise exception 'durable.start: % limits its tasks per concurrency key, which its '
            'code computes from the arguments; pass concurrency_key => ...',
            left(to_json(start.name)::text, 200) using errcode = '22023';
    end if;
    queue := coalesce(start.queue, d.queue, 'default');
    kind := coalesce(start.kind, d.kind, 'task');
    priority := coalesce(start.priority, d.priority, 0);
    max_attempts := coalesce(start.max_attempts, d.max_attempts, 3);
    timeout := coalesce(start.timeout, d.timeout);
    deadline := coalesce(start.deadline, d.deadline);
    if start.concurrency_key is not null then
        key_limit := coalesce(start.key_limit, d.key_limit);
        rate_limit := d.key_rate_limit;
        rate_period := d.key_rate_period;
    end if;
    if length(start.queue) not between 1 and 200 then
        raise exception 'durable.start: queue must be 1 to 200 characters, got %',
            length(start.queue) || ' characters' using errcode = '22023';
    end if;
    if start.kind not in ('task', 'workflow') then
        raise exception 'durable.start: kind must be task or workflow, got %',
            left(to_json(start.kind)::text, 60) using errcode = '22023';
    end if;
    if start.max_attempts < 1 then
        raise exception 'durable.start: max_attempts must be at least 1, got %',
            start.max_attempts using errcode = '22023';
    end if;
    if start.timeout is not null and not (start.timeout > 0 and start.timeout < 'infinity') then
        raise exception 'durable.start: timeout must be a positive number of seconds, got %',
            start.timeout using errcode = '22023';
    end if;
    if start.key_limit is not null and start.key_limit < 1 then
        raise exception 'durable.start: key_limit must be at least 1, got %', start.key_limit
            using errcode = '22023';
    end if;
    if start.concurrency_key is not null and length(start.concurrency_key) not between 1 and 500
    then
        raise exception 'durable.start: concurrency_key must be 1 to 500 characters, got %',
            length(start.concurrency_key) using errcode = '22023';
    end if;
    if start.key_limit is not null and start.concurrency_key is null then
        raise exception 'durable.start: key_limit needs a concurrency_key' using errcode = '22023';
    end if;
    if start.idempotency_key is not null
       and octet_length(start.idempotency_key) not between 1 and 2000 then
        raise exception 'durable.start: idempotency_key must be 1 to 2000 bytes, got %',
            octet_length(start.idempotency_key) using errcode = '22023';
    end if;
    -- The rest as client.start checks them (durable.validation), in its words.
    if start.deadline is not null
       and not (start.deadline > -10 * 365 * 86400 and start.deadline < 10 * 365 * 86400) then
        raise exception 'durable.start: deadline must be within 10 years, got %',
            start.deadline using errcode = '22023';
    end if;
    if start.idempotency is not null then
        if start.idempotency not in ('forever', 'active') then
            raise exception 'durable.start: idempotency must be ''forever'' or ''active'', got %',
                left(to_json(start.idempotency)::text, 60) using errcode = '22023';
        end if;
        if start.idempotency_key is null then
            raise exception 'durable.start: idempotency needs an idempotency_key'
                using errcode = '22023';
        end if;
    end if;
    if start.debounce is null
       and (start.debounce_key is not null or start.max_delay is not null) then
        raise exception 'durable.start: debounce_key and max_delay need debounce => seconds'
            using errcode = '22023';
    end if;
    if start.debounce is not null then
        if not (start.debounce >= 0 and start.debounce < 10 * 365 * 86400) then
            raise exception 'durable.start: debounce must be a number of seconds from 0 to 10 years, got %',
                start.debounce using errcode = '22023';
        end if;
        if start.max_delay is not null
           and not (start.max_delay >= 0 and start.max_delay < 10 * 365 * 86400) then
            raise exception 'durable.start: max_delay must be a number of seconds from 0 to 10 years, got %',
                start.max_delay using errcode = '22023';
        end if;
        if start.max_delay < start.debounce then
            raise exception 'durable.start: max_delay (%s) must be at least debounce (%s)',
                start.max_delay, start.debounce using errcode = '22023';
        end if;
        if start.idempotency_key is not null or start.run_at is not null then
            raise exception 'durable.start: debounce cannot be combined with idempotency_key or run_at'
                using errcode = '22023';
        end if;
        bounce_key := coalesce(start.debounce_key, start.name);
        if octet_length(bounce_key) not between 1 and 2000 then
            raise exception 'durable.start: debounce_key must be 1 to 2000 bytes, got %',
                octet_length(bounce_key) using errcode = '22023';
        end if;
        -- As client.start(debounce=...): the queued task of the key, if any, takes this
        -- start's arguments and options (the last start wins) and runs `debounce` seconds
        -- from now, never later than `max_delay` seconds after the first of its starts (any
        -- start's: a later one may bring that time closer, never push it back); else a new
        -- task. It keeps its id, name, key, created_at, tags and attributes.
        insert into durable.tasks as t
            (queue, name, kind, args, kwargs, priority, run_at, max_attempts, timeout,
             concurrency_key, key_limit, key_rate_limit, key_rate_period, version, deadline,
             debounce_key, debounce_until)
        values
            (start.queue, start.name, start.kind, start.args, start.kwargs, start.priority,
             least(now() + make_interval(secs => start.debounce),
                   now() + make_interval(secs => start.max_delay)),
             start.max_attempts, start.timeout, start.concurrency_key, start.key_limit,
             rate_limit, rate_period, d.version,
             now() + make_interval(secs => start.deadline), bounce_key,
             now() + make_interval(secs => start.max_delay))
        on conflict (debounce_key) where debounce_key is not null and status = 'queued'
            do update set queue = excluded.queue, kind = excluded.kind, args = excluded.args,
                          kwargs = excluded.kwargs, priority = excluded.priority,
                          max_attempts = excluded.max_attempts, timeout = excluded.timeout,
                          concurrency_key = excluded.concurrency_key,
                          key_limit = excluded.key_limit,
                          key_rate_limit = excluded.key_rate_limit,
                          key_rate_period = excluded.key_rate_period,
                          trace_context = excluded.trace_context, version = excluded.version,
                          deadline = excluded.deadline,
                          -- Every expression reads the row as it was: the bound is
                          -- computed for both columns.
                          debounce_until = least(t.debounce_until, t.created_at
                              + make_interval(secs => start.max_delay)),
                          run_at = least(excluded.run_at, t.debounce_until, t.created_at
                              + make_interval(secs => start.max_delay))
                where t.name = excluded.name
        returning t.id into new_id;
        if new_id is null then
            raise exception 'durable.start: debounce_key % is pending for a task other than %',
                left(to_json(bounce_key)::text, 200), left(to_json(start.name)::text, 200)
                using errcode = '22023';
        end if;
        return new_id;
    end if;
    if start.idempotency_key is not null
       and coalesce(start.idempotency, d.idempotency) = 'active' then
        -- The key returns its task only while that one is unfinished (insert_task_active).
        insert into durable.tasks as t
            (queue, name, kind, args, kwargs, priority, run_at, max_attempts, timeout,
             concurrency_key, key_limit, key_rate_limit, key_rate_period, version, deadline,
             active_key)
        values
            (start.queue, start.name, start.kind, start.args, start.kwargs, start.priority,
             coalesce(start.run_at, now()), start.max_attempts, start.timeout,
             start.concurrency_key, start.key_limit, rate_limit, rate_period, d.version,
             now() + make_interval(secs => start.deadline), start.idempotency_key)
        on conflict (active_key)
            where active_key is not null and status in ('queued', 'running', 'waiting')
            do update set active_key = excluded.active_key
        returning t.id into new_id;
        return new_id;
    end if;
    insert into durable.tasks as t
        (queue, name, kind, args, kwargs, priority, run_at, max_attempts, timeout,
         idempotency_key, concurrency_key, key_limit, key_rate_limit, key_rate_period, version,
         deadline)
    values
        (start.queue, start.name, start.kind, start.args, start.kwargs, start.priority,
         coalesce(start.run_at, now()), start.max_attempts, start.timeout,
         start.idempotency_key, start.concurrency_key, start.key_limit, rate_limit,
         rate_period, d.version, now() + make_interval(secs => start.deadline))
    on conflict (idempotency_key) where idempotency_key is not null
        do update set idempotency_key = excluded.idempotency_key
    returning t.id into new_id;
    return new_id;
end;
$$;

-- Tag a task from SQL in the transaction that started it (the task must still be queued):
--   select durable.tag(durable.start('fulfill', '["order-17"]'), array['vip'], '{"region": "eu"}');
-- Tags are added to the task's (a set); attributes are merged, a key given again replaced.
-- The limits are durable.validation's (tags_and_attributes), one line naming the field.
create function durable.tag(task_id bigint, tags text[] default null,
                            attributes jsonb default null)
returns bigint
language plpgsql
set search_path = pg_catalog, pg_temp as $$
#variable_conflict use_column
declare
    merged_tags text[];
    merged_attributes jsonb;
    bad text;
begin
    if tag.attributes is not null and jsonb_typeof(tag.attributes) <> 'object' then
        raise exception 'durable.tag: attributes must be a JSON object, not %',
            jsonb_typeof(tag.attributes) using errcode = '22023';
    end if;
    select x into bad from unnest(tag.tags) x
     where x is null or length(x) not between 1 and 100 limit 1;
    if found then
        raise exception 'durable.tag: a tag must be 1 to 100 characters, got %',
            coalesce(length(bad) || ' characters', 'null') using errcode = '22023';
    end if;
    select k into bad from jsonb_each(tag.attributes) a(k, v)
     where length(k) not between 1 and 100
        or jsonb_typeof(v) not in ('string', 'number', 'boolean')
        or (jsonb_typeof(v) = 'string' and length(v #>> '{}') > 500) limit 1;
    if found then
        raise exception 'durable.tag: attribute % must have a name of 1 to 100 characters and a string (at most 500 characters), number or boolean value',
            left(to_json(bad)::text, 120) using errcode = '22023';
    end if;
    select t.tags, t.attributes into merged_tags, merged_attributes
      from durable.tasks t where t.id = tag.task_id and t.status = 'queued' for update;
    if not found then
        raise exception 'durable.tag: no queued task %: tag a task in the transaction that starts it',
            tag.task_id using errcode = '22023';
    end if;
    merged_tags := array(select distinct x from unnest(coalesce(merged_tags, '{}') || coalesce(tag.tags, '{}')) x order by x);
    merged_attributes := coalesce(merged_attributes, '{}') || coalesce(tag.attributes, '{}');
    if cardinality(merged_tags) > 20 then
        raise exception 'durable.tag: at most 20 tags a task, got %', cardinality(merged_tags)
            using errcode = '22023';
    end if;
    if (select count(*) from jsonb_object_keys(merged_attributes)) > 20 then
        raise exception 'durable.tag: at most 20 attributes a task, got %',
            (select count(*) from jsonb_object_keys(merged_attributes)) using errcode = '22023';
    end if;
    update durable.tasks t
       set tags = nullif(merged_tags, '{}'),
           attributes = nullif(merged_attributes, '{}'::jsonb)
     where t.id = tag.task_id;
    return tag.task_id;
end;
$$;

-- Deliver an event to a workflow, from any session or trigger. Returns false when the
-- task does not exist or has finished. With an idempotency key, a second delivery of the
-- same key to the same task stores nothing and returns true (the producer's retry). A
-- payload over 16 MiB is refused, as by a client (durable.check_payload).
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
    perform durable.check_payload('durable.send_event', 'payload', send_event.payload);
    -- The row lock serialises every delivery to this task, so the key's check below sees
    -- a concurrent producer's committed delivery.
    select t.status into st from durable.tasks t where t.id = send_event.task_id for update;
    if st is null then
        return false;
    end if;
    -- Delivered before, even if the task has finished since; or delivered to an earlier
    -- run of its chain (ctx.continue_as_new): a producer that finds the chain's current
    -- run again (a start with the chain's idempotency key) and resends an event the run
    -- before took must not deliver it twice. The earlier runs are reached through
    -- continued_from, one probe each; retention ends the walk where it pruned the chain.
    if send_event.idempotency_key is not null and exists (
        with recursive chain (id) as (
            select send_event.task_id
            union all
            select t.continued_from from durable.tasks t join chain c on t.id = c.id
             where t.continued_from is not null
        )
        select 1 from durable.signals s
         where s.task_id in (select id from chain)
           and s.idempotency_key = send_event.idempotency_key) then
        return true;
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
create function durable.suspend(
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

-- End a workflow's run and start its next one (ctx.continue_as_new): a new task of the
-- same name and options (version, deadline, labels, limits) with arguments
-- `new_args`/`new_kwargs` and an empty log, which takes over the idempotency key of
-- either scope and the events sent to this run that it did not take; the run ends
-- completed, `continued_as` the new one. The deadline is the chain's: it does not move.
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

-- Run a finished task again: 'retry' keeps its history but the failure that ended it (the
-- events its error names under `replay`, when nothing was recorded after the workflow saw
-- them); 'replay' starts a new, empty branch; 'fork' starts a new branch holding the events
-- before position `at`. Retry and fork also run again the children the workflow had not
-- seen end that failed, were cancelled (or asked to stop) or were deleted. Returns the
-- branch. Refused, changing nothing: a task not finished; a run that continued as new
-- (ctx.continue_as_new: run again, it would start a second next run beside the chain's
-- own); a task whose deadline passed (its claim would fail it at once, over the error the
-- operator came to fix); a fork of a plain task (it has no event log); a fork position
-- outside its log; a task whose idempotency key of scope "active" another
-- unfinished task holds.
create function durable.restart(task bigint, mode text, at integer default null)
returns integer
language plpgsql
set search_path = pg_catalog, pg_temp as $$
declare
    cur record;
    new_branch integer;
    other bigint;
    length_ integer;
begin
    -- Its unfinished children's rows first (the order of durable.lock_trees), then its
    -- own; the statements after see a child's outcome that committed meanwhile. A child
    -- whose failure was being written as the parent was retried was read as running: its
    -- event stayed, and the retried parent failed again with the child's old error.
    perform 1 from durable.tasks c
     where c.parent_id = task and c.status in ('queued', 'running', 'waiting')
     order by c.id desc
       for update;
    select t.status, t.branch, t.error, t.continued_as, t.active_key, t.kind, t.deadline
      into cur
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
    if mode = 'fork' and cur.kind <> 'workflow' then
        raise exception 'task % is a plain task, not a workflow: it has no event log to fork '
            '(retry runs it again)', task using errcode = '22023';
    end if;
    if cur.deadline <= now() then
        -- As Python prints the datetime (the deadline's own message, the client's value).
        raise exception 'task %''s deadline passed at %: it cannot run again (start a new task)',
            task, to_char(cur.deadline at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
                  || case when extract(microseconds from cur.deadline)::bigint % 1000000 = 0
                          then '' else to_char(cur.deadline at time zone 'UTC', '.US') end
                  || '+00:00'
            using errcode = '55000';
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
                -- An error stored before errors named their positions (nor held `attrs`):
                -- the last event, when it failed. Not an error that is no call's failure
                -- (an expired lease, a cancel, the workflow's own): the last event is then
                -- a failure the workflow handled, which stays.
                or (cur.error -> 'replay' is null and not (cur.error ? 'attrs')
                    and cur.error ->> 'type' <> 'durable.LeaseExpired'
                    and e.status = 'failed'
                    and e.seq = (select max(x.seq) from durable.events x
                                  where x.task_id = task and x.branch = cur.branch)));
    elsif mode in ('replay', 'fork') then
        select greatest(coalesce(max(e.branch), 0), cur.branch) + 1 into new_branch
          from durable.events e where e.task_id = task;
        if mode = 'fork' then
            select coalesce(max(e.seq) + 1, 0) into length_ from durable.events e
             where e.task_id = task and e.branch = cur.branch;
            if at is null or at < 0 or at > length_ then
                raise exception 'fork: at must be a position from 0 to % (the end of branch % '
                    'of task %''s event log), got %', length_, cur.branch, task,
                    coalesce(at::text, 'none') using errcode = '22023';
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
    -- Children the workflow had not seen end and that failed, were cancelled (a child
    -- asked to stop ends cancelled, whatever its attempt does) or were deleted: awaited,
    -- they would end the run again as they ended it (a workflow cancelled on its child
    -- takes the child along), so they run again. A child still running is kept, and
    -- awaited.
    delete from durable.events e
     where e.task_id = task and e.branch = new_branch and e.kind = 'child'
       and e.status = 'pending'
       and not exists (select 1 from durable.tasks c
                       where c.id = e.child_id and not c.cancel_requested
                         and c.status not in ('failed', 'cancelled'));
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
           debounce_key = null, debounce_until = null,
           active_key = null
     where t.id = task;
    if cur.active_key is not null then
        -- The key back, in a block of its own: the check above does not see a task given
        -- the key by a transaction not committed yet (a start, another restart), and the
        -- key's unique index, which waits for that transaction, then refuses the update.
        -- (Only keyed restarts pay for the block's subtransaction.)
        begin
            update durable.tasks t set active_key = cur.active_key where t.id = task;
        exception when unique_violation then
            select o.id into other from durable.tasks o
             where o.active_key = cur.active_key and o.id <> task
               and o.status in ('queued', 'running', 'waiting');
            raise exception 'task % has the idempotency key of task %, which has not '
                'finished: finish or cancel that one first', task, other using errcode = '55000';
        end;
    end if;
    return new_branch;
end;
$$;

-- Fleet-wide flow control and cron schedules.

create index tasks_running_key_idx on durable.tasks (concurrency_key)
    where status = 'running' and concurrency_key is not null;
create index tasks_keyed_ready_idx on durable.tasks (queue)
    where status = 'queued' and concurrency_key is not null;

-- Limits that hold across every daemon; a queue without a row has none.
create table durable.queues (
    name          text primary key,
    concurrency   integer,
    rate_limit    integer,
    rate_period   double precision,
    updated_at    timestamptz not null default now(),
    -- `durable queues pause`: no daemon claims from the queue until it is resumed.
    paused        boolean not null default false,
    constraint queues_concurrency_check check (concurrency is null or concurrency >= 1),
    constraint queues_rate_check check (
        (rate_limit is null or rate_limit >= 1)
        and ((rate_limit is null) = (rate_period is null))
        and (rate_period is null or rate_period > 0)),
    -- What the claim can work with. Past a year `now() - period` leaves the range of
    -- a timestamp (and NaN compares above every number).
    constraint queues_name_check check (length(name) between 1 and 200),
    constraint queues_period_check check (rate_period <= 31536000)
);

-- Recent starts of rate-limited queues ('q:' || queue) and keys ('k:' || key).
create table durable.rate_log (
    bucket  text not null,
    at      timestamptz not null
);
create index rate_log_idx on durable.rate_log (bucket, at);

create table durable.schedules (
    name         text primary key,
    task_name    text not null,
    cron         text not null,
    timezone     text not null default 'UTC',
    args         jsonb not null default '[]',
    kwargs       jsonb not null default '{}',
    queue        text,
    source       text not null default 'cli',
    next_run_at  timestamptz not null,
    last_run_at  timestamptz,
    last_task_id bigint,
    created_at   timestamptz not null default now(),
    constraint schedules_source_check check (source in ('code', 'cli')),
    -- Names that fit the tasks they start; the expression and time zone are checked
    -- where they are written (durable.validation), as the scheduler reads them.
    constraint schedules_name_check check (
        length(name) between 1 and 200 and length(task_name) between 1 and 200
        and (queue is null or length(queue) between 1 and 200)),
    constraint schedules_cron_check check (
        length(cron) between 1 and 200 and length(timezone) between 1 and 100),
    constraint schedules_args_check check (
        jsonb_typeof(args) = 'array' and jsonb_typeof(kwargs) = 'object')
);

-- Claim up to n ready tasks of queue q that this daemon can run. Queues with a fleet-wide
-- limit serialise their claimers on an advisory lock, and claimers of keyed tasks on
-- another, shared by every queue: the counts below are read after the lock is granted
-- (each statement of this function takes a new snapshot), so concurrent claimers can
-- never overshoot a limit. Every claimer, first of all, holds its queue's pause lock
-- shared: `durable queues pause` waits on it. Every row is locked and its status checked
-- again before it is taken: a task is claimed once. `fresh`: never claimed before, so a
-- workflow has no events to load. A claimed task forgets its debounce key: later starts
-- with the key make a task of their own, and whatever brings this one back to the queue (a
-- retry, a wake-up, an expired lease) must not meet theirs on the key's unique index.
--
-- A claim commits asynchronously: its commit does not wait for the WAL flush. A
-- claim lost in a server crash leaves its tasks queued, and they run again, as after any
-- crash. Whatever makes an attempt's work durable (a checkpoint, a completion, a
-- transactional step) commits synchronously, fenced on the claim token, and flushes the
-- WAL before it, the claim's included.
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
    ignored text;
    -- The time this claim starts its tasks, taken once any lock below is granted: a
    -- claim that waited for a limit's lock, stamping its starts with its transaction's
    -- earlier now(), let the next claim count them out of the rate window too soon.
    stamp timestamptz;
begin
    -- Assignments, not PERFORM: a plain function call assigned is evaluated in place,
    -- where PERFORM runs a query.
    ignored := set_config('synchronous_commit', 'off', true);  -- for this transaction only
    -- The pause barrier. The flag alone is no barrier: a pause that commits between a
    -- claim's read of it and its update returned while that claim still took tasks.
    -- `durable queues pause` commits the flag, then takes this lock EXCLUSIVE: it returns
    -- once every claim that may have read the queue unpaused has ended. Taken before the
    -- read below, whose snapshot is then taken after it, and SHARED: claims never wait
    -- for each other on it, and an unlimited queue's claim pays this one lock, no second
    -- read of the flag. A claim asking for it after the pause did queues behind the pause
    -- (Postgres grants no lock over an earlier conflicting waiter), so the pause cannot
    -- starve. A key of its own, not the queue's 'durable.queue:' one: a limited queue's
    -- claimers take that one exclusive, and two of them holding it shared while each
    -- asked for it exclusive would deadlock.
    ignored := pg_advisory_xact_lock_shared(hashtextextended('durable.pause:' || q, 0));
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
        -- later statement's snapshot, so that the claimers queued on a limit's lock give
        -- up at once rather than each take tasks while the pause waits for them. (The
        -- barrier alone would be correct; an unlimited queue's claim, which waits for no
        -- lock here, skips this statement.)
        if exists (select 1 from durable.queues c where c.name = q and c.paused) then
            return;
        end if;
    end if;
    stamp := clock_timestamp();
    if conc is not null then
        select count(*) into busy from durable.tasks t where t.queue = q and t.status = 'running';
        n := least(n, conc - busy);
    end if;
    if rate is not null then
        delete from durable.rate_log r
         where r.bucket = 'q:' || q and r.at <= stamp - make_interval(secs => period);
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
        ignored := set_config('durable.claiming', 'on', true);  -- see tasks_after_update
        level := (select max(t.priority) from durable.tasks t
                   where t.queue = q and t.status = 'queued');
        while level is not null loop
            return query
            with ready as (
                -- Keyed tasks only under the keys' lock, by the branch below: one
                -- committed after the first statement looked would escape its limits.
                select t.id, t.started_at from durable.tasks t
                where t.queue = q and t.status = 'queued' and t.priority = level
                  and t.run_at <= stamp and t.name = any(names)
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
                   lease_until = stamp + make_interval(secs => lease), worker_id = worker,
                   started_at = coalesce(t.started_at, stamp), debounce_key = null
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
        ignored := set_config('durable.claiming', '', true);
        if rate is not null and claimed > 0 then
            insert into durable.rate_log (bucket, at)
                select 'q:' || q, stamp from generate_series(1, claimed);
        end if;
        return;
    end if;

    ignored := set_config('durable.claiming', 'on', true);
    return query
    with keys as (
        select k.concurrency_key as key,
               (select count(*) from durable.tasks r
                 where r.status = 'running' and r.concurrency_key = k.concurrency_key) as running,
               (select count(*) from durable.rate_log l
                 where l.bucket = 'k:' || k.concurrency_key
                   and l.at > stamp - make_interval(
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
         where t.queue = q and t.status = 'queued' and t.run_at <= stamp
           and t.name = any(names)
           -- A versioned task only where this daemon has its version: `names`
           -- holds name || chr(31) || version for each versioned definition. An
           -- unversioned task pays one null test.
           and (t.version is null or t.name || chr(31) || t.version = any(names))
    ), chosen as (
        select r.id, r.concurrency_key
          from ranked r left join keys k on k.key = r.concurrency_key
         where r.concurrency_key is null
            or (r.rn + k.running <= coalesce(k.key_limit, 2147483647)
                and r.rn + k.recent <= coalesce(k.key_rate_limit, 2147483647))
         order by r.priority desc, r.run_at, r.id
         limit n
    ), ready as (
        -- The status again, on the locked row: a row that another claim or a
        -- cancel changed after this statement's snapshot is re-checked by these conditions
        -- once its lock is granted, and the join's alone would let it through. So are
        -- what a later debounced start of a pending task replaces (durable.start): its
        -- queue, run time, version and concurrency key.
        select t.id, t.started_at from durable.tasks t join chosen c using (id)
         where t.status = 'queued' and t.queue = q and t.run_at <= stamp
           and (t.version is null or t.name || chr(31) || t.version = any(names))
           and t.concurrency_key is not distinct from c.concurrency_key
         for update of t skip locked
    ), started as (
        update durable.tasks t
           set status = 'running', claim_token = durable.new_token(),
               lease_until = stamp + make_interval(secs => lease), worker_id = worker,
               started_at = coalesce(t.started_at, stamp), debounce_key = null
          from ready
         where t.id = ready.id
        returning t.*, ready.started_at is null as fresh
    ), logged as (
        insert into durable.rate_log (bucket, at)
        select 'q:' || q, stamp from started where rate is not null
        union all
        select 'k:' || s.concurrency_key, stamp from started s
         where s.concurrency_key is not null and s.key_rate_limit is not null
    )
    select s.id, s.queue::text, s.name::text, s.kind::text, s.args::text, s.kwargs::text,
           s.attempt::integer, s.max_attempts::integer, s.timeout::double precision,
           s.claim_token, s.branch, s.parent_id, s.root_id, s.cancel_requested, s.fresh,
           s.deadline
      from started s;
    ignored := set_config('durable.claiming', '', true);
end;
$$;

-- When the next queued task of queue q that a daemon can run (`names`, as for durable.claim)
-- becomes due: in each priority level of tasks_ready_idx (found by a loose index scan, one
-- descent each; a single one for a queue with nothing queued) the first entry with one of
-- its names, so scheduled tasks are not read. A queue loop asks it when its claim found
-- nothing (the next_due query), and the poll for every queue (durable.due_queues).
create function durable.next_due(q text, names text[]) returns timestamptz
language sql stable
set search_path = pg_catalog, pg_temp as $$
    with recursive levels (p) as (
        select max(t.priority) from durable.tasks t
         where t.queue = next_due.q and t.status = 'queued'
        union all
        select (select max(t.priority) from durable.tasks t
                 where t.queue = next_due.q and t.status = 'queued' and t.priority < l.p)
          from levels l where l.p is not null
    )
    select min((select t.run_at from durable.tasks t
                 where t.queue = next_due.q and t.status = 'queued' and t.priority = l.p
                   and t.name = any(next_due.names)
                   and (t.version is null
                        or t.name || chr(31) || t.version = any(next_due.names))
                 order by t.run_at limit 1))
      from levels l where l.p is not null
$$;

-- The daemon's poll, one statement for every queue it serves, however many: each queue of
-- `serving` with a queued task the daemon can run due within `within` seconds, with the
-- seconds until the first is due (zero or less: due now), on the database's clock. JIT
-- off: estimated per queue, the statement's cost for a few hundred queues passed JIT's
-- thresholds, and compiling it took half a second of the server's CPU for a
-- millisecond's work.
create function durable.due_queues(serving text[], names text[], within double precision)
returns table (queue text, wait double precision)
language sql stable
set search_path = pg_catalog, pg_temp
set jit = off as $$
    select s.queue, extract(epoch from d.due - now())::double precision
      from unnest(due_queues.serving) as s (queue)
     cross join lateral (
        select durable.next_due(s.queue, due_queues.names) as due
        offset 0  -- kept apart: flattened, the test below ran the function a second time
     ) d
     where d.due < now() + make_interval(secs => due_queues.within)
$$;

-- Seconds until a rate-limited queue may start its next task (null: not rate-limited now).
create function durable.claim_delay(q text) returns double precision
language sql stable
set search_path = pg_catalog, pg_temp as $$
    -- The period clamped as durable.claim clamps it.
    select extract(epoch from (min(l.at) + make_interval(secs => least(c.rate_period, 946080000))
                               - now()))
      from durable.queues c
      join durable.rate_log l on l.bucket = 'q:' || c.name
     where c.name = q and c.rate_limit is not null
       and l.at > now() - make_interval(secs => least(c.rate_period, 946080000))
     group by c.rate_period, c.rate_limit
    having count(*) >= c.rate_limit
$$;
