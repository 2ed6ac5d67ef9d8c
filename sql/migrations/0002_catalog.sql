-- The catalog of definitions (what the daemons serve), the version a task started on, a
-- durable.start that resolves names through the catalog, and a claim that takes a
-- versioned task only where its version's code is.

alter table durable.tasks add column version text;

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
    constraint definitions_name_check check (
        length(name) between 1 and 200 and length(queue) between 1 and 200),
    constraint definitions_kind_check check (kind in ('task', 'workflow')),
    constraint definitions_attempts_check check (max_attempts >= 1),
    constraint definitions_version_check check (version is null or length(version) between 1 and 100)
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

drop function durable.start(text, jsonb, jsonb, text, integer, timestamptz, integer,
                            double precision, text, text, text, integer);

-- Enqueue from SQL, inside the caller's transaction (a transactional outbox). The name is
-- resolved through the catalog (durable.definitions): the task gets its definition's
-- kind, queue, defaults and version, and the arguments given here override them. A name
-- no daemon ever published is refused unless a queue is given or allow_unknown is true.
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
    allow_unknown boolean default false
) returns bigint
language plpgsql
set search_path = pg_catalog, pg_temp as $$
#variable_conflict use_column
declare
    new_id bigint;
    d durable.definitions%rowtype;
    rate_limit integer;
    rate_period double precision;
begin
    if jsonb_typeof(args) is distinct from 'array' then
        raise exception 'durable.start: args must be a JSON array, not %', jsonb_typeof(args)
            using errcode = '22023';
    end if;
    if jsonb_typeof(kwargs) is distinct from 'object' then
        raise exception 'durable.start: kwargs must be a JSON object, not %', jsonb_typeof(kwargs)
            using errcode = '22023';
    end if;
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
    insert into durable.tasks as t
        (queue, name, kind, args, kwargs, priority, run_at, max_attempts, timeout,
         idempotency_key, concurrency_key, key_limit, key_rate_limit, key_rate_period, version)
    values
        (start.queue, start.name, start.kind, start.args, start.kwargs, start.priority,
         coalesce(start.run_at, now()), start.max_attempts, start.timeout,
         start.idempotency_key, start.concurrency_key, start.key_limit, rate_limit,
         rate_period, d.version)
    on conflict (idempotency_key) where idempotency_key is not null
        do update set idempotency_key = excluded.idempotency_key
    returning t.id into new_id;
    return new_id;
end;
$$;

-- Claim up to n ready tasks of queue q that this daemon can run. Queues with a fleet-wide
-- limit serialise their claimers on an advisory lock, and claimers of keyed tasks on
-- another, shared by every queue: the counts below are read after the lock is granted
-- (each statement of this function takes a new snapshot), so concurrent claimers can
-- never overshoot a limit. Every row is locked and its status checked again before it is
-- taken: a task is claimed once. `fresh`: never claimed before, so a workflow has no
-- events to load.
--
-- A claim commits asynchronously: its commit does not wait for the WAL flush. A
-- claim lost in a server crash leaves its tasks queued, and they run again, as after any
-- crash. Whatever makes an attempt's work durable (a checkpoint, a completion, a
-- transactional step) commits synchronously, fenced on the claim token, and flushes the
-- WAL before it, the claim's included.
create or replace function durable.claim(q text, names text[], n integer, lease double precision,
                              worker uuid)
returns table (id bigint, queue text, name text, kind text, args text, kwargs text,
               attempt integer, max_attempts integer, timeout double precision,
               claim_token bigint, branch integer, parent_id bigint, root_id bigint,
               cancel_requested boolean, fresh boolean)
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
begin
    perform set_config('synchronous_commit', 'off', true);  -- for this transaction only
    -- Scalars, not a record: a record with a null field is neither null nor not null.
    -- One statement reads the queue's limits and whether keyed tasks wait in it.
    select c.concurrency, c.rate_limit, c.rate_period,
           exists (select 1 from durable.tasks t
                    where t.queue = q and t.status = 'queued' and t.concurrency_key is not null)
      into conc, rate, period, keyed
      from (values (1)) as one left join durable.queues c on c.name = q;
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
                      t.root_id, t.cancel_requested, ready.started_at is null;
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
           s.claim_token, s.branch, s.parent_id, s.root_id, s.cancel_requested, s.fresh
      from started s;
    perform set_config('durable.claiming', '', true);
end;
$$;
