-- 0019: `durable queues pause` is a barrier.
--
-- A claim read the pause flag in its first statement and took its tasks in a later one:
-- a pause that committed in between returned to the operator while that claim still took
-- tasks (an unlimited queue's claim never read the flag again; a limited or keyed one read
-- it once more after its locks, and the window stayed open between that read and its
-- update). Every claim now holds its queue's pause lock shared from before its first read,
-- and the pause, once its flag has committed, takes that lock exclusive
-- (queries.sql `pause_barrier`): it returns once the claims that may have read the queue
-- unpaused have ended.

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
