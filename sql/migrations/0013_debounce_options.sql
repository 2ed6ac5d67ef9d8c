-- 0013: a later debounced start replaces the pending task's options, not only its
-- arguments.
--
-- A debounced start that met the key's queued task replaced its arguments, trace context
-- and run time, and left it with the first start's priority, attempts, timeout, deadline,
-- queue, version and concurrency key: a caller that changed any of them saw its task run
-- with someone else's. The last start now wins, as its arguments do. The task keeps its
-- id, name, key and created_at, and its tags and attributes (labels added with
-- durable.tag, which accumulate). max_delay still counts from the first start; a later
-- start's may bring the latest run time closer, never push it back.
--
-- A keyed claim re-checked only the status of the rows it locked: a debounced start that
-- committed between the claim's snapshot and its lock could move the task to another
-- queue, version or concurrency key, or push its run time back, and be claimed anyway.
-- It re-checks those too, as the plain claim does.

-- Claim up to n ready tasks of queue q that this daemon can run. Queues with a fleet-wide
-- limit serialise their claimers on an advisory lock, and claimers of keyed tasks on
-- another, shared by every queue: the counts below are read after the lock is granted
-- (each statement of this function takes a new snapshot), so concurrent claimers can
-- never overshoot a limit. Every row is locked and its status checked again before it is
-- taken: a task is claimed once. `fresh`: never claimed before, so a workflow has no
-- events to load. A claimed task forgets its debounce key: later starts with the key make
-- a task of their own, and whatever brings this one back to the queue (a retry, a wake-up,
-- an expired lease) must not meet theirs on the key's unique index.
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

-- Enqueue from SQL, inside the caller's transaction (a transactional outbox). The name is
-- resolved through the catalog (durable.definitions): the task gets its definition's
-- kind, queue, defaults and version, and the arguments given here override them. A name
-- no daemon ever published is refused unless a queue is given or allow_unknown is true.
-- deadline (seconds from now), idempotency ('forever' or 'active') and debounce,
-- debounce_key, max_delay mean what they mean to client.start.
create or replace function durable.start(
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
