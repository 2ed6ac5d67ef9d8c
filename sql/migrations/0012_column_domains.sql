-- The checks on one column of durable.tasks move into domains; the table keeps the ones
-- that relate columns (the claim token and lease of a running task, a rate limit's
-- period).
--
-- PostgreSQL evaluates every CHECK constraint of a table on every row an UPDATE writes,
-- whatever columns it changes, and compiles them afresh for every statement. With nine of
-- them on durable.tasks that cost a claim-like update about 70 µs of its 0.5 ms, and an
-- insert about 20 µs (statements 10 ms apart, PostgreSQL 15). A domain's check is part of
-- the statement's plan, so a prepared statement compiles it once, and it runs only where a
-- value is written to a column of that type: a claim, which writes the status and the
-- lease, no longer checks the name, the queue, the kind, the attempts or the limits.
--
-- The domains are created without their checks and added after the columns change type:
-- a column whose new type carries a check makes ALTER TABLE rewrite the table and its
-- indexes, while adding a domain's check only reads the rows once to validate them. The
-- partial indexes that name a changed column are built again; they hold unfinished tasks
-- only (200,000 finished tasks: 0.34 s in all, PostgreSQL 15).

create domain durable.task_status as text;
create domain durable.task_kind as text;
create domain durable.label as text;
create domain durable.positive_int as integer;
create domain durable.positive_seconds as double precision;

alter table durable.tasks
    drop constraint tasks_key_check,
    drop constraint tasks_kind_check,
    drop constraint tasks_status_check,
    drop constraint tasks_queue_check,
    drop constraint tasks_name_check,
    drop constraint tasks_attempts_check,
    drop constraint tasks_timeout_check;

-- Its WHEN clause reads the status: a trigger holds the type of what it reads.
drop trigger tasks_notify_ready on durable.tasks;

alter table durable.tasks
    alter column queue type durable.label,
    alter column name type durable.label,
    alter column kind type durable.task_kind,
    alter column status type durable.task_status,
    alter column attempt type durable.positive_int,
    alter column max_attempts type durable.positive_int,
    alter column timeout type durable.positive_seconds,
    alter column key_limit type durable.positive_int,
    alter column key_rate_limit type durable.positive_int,
    alter column key_rate_period type durable.positive_seconds;

alter domain durable.task_status add constraint task_status_check
    check (value in ('queued', 'running', 'waiting', 'completed', 'failed', 'cancelled'));
alter domain durable.task_kind add constraint task_kind_check
    check (value in ('task', 'workflow'));
alter domain durable.label add constraint label_check check (length(value) between 1 and 200);
alter domain durable.positive_int add constraint positive_int_check check (value >= 1);
alter domain durable.positive_seconds add constraint positive_seconds_check check (value > 0);

-- A rate limit and its period come together.
alter table durable.tasks add constraint tasks_key_check
    check ((key_rate_limit is null) = (key_rate_period is null));

create trigger tasks_notify_ready after update on durable.tasks
    for each row
    when (new.status = 'queued' and (old.status <> 'queued' or old.run_at <> new.run_at))
    execute function durable.notify_ready();

-- The claim's RETURN QUERY must return exactly the types it declares: the domains' values
-- go out as their base types.
create or replace function durable.claim(q text, names text[], n integer, lease double precision,
                              worker uuid)
returns table (id bigint, queue text, name text, kind text, args text, kwargs text,
               attempt integer, max_attempts integer, timeout double precision,
               claim_token bigint, branch integer, parent_id bigint, root_id bigint,
               cancel_requested boolean, fresh boolean)
language plpgsql as $$
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
    -- A transaction-level advisory lock: it serialises this queue's claimers without
    -- writing to any row.
    if keyed or conc is not null or rate is not null then
        perform pg_advisory_xact_lock(hashtextextended('durable.queue:' || q, 0));
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
                select t.id, t.started_at from durable.tasks t
                where t.queue = q and t.status = 'queued' and t.priority = level
                  and t.run_at <= now() and t.name = any(names)
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
                   and l.at > now() - make_interval(secs => k.key_rate_period)) as recent,
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
    ), chosen as (
        select r.id from ranked r left join keys k on k.key = r.concurrency_key
         where r.concurrency_key is null
            or (r.rn + k.running <= coalesce(k.key_limit, 2147483647)
                and r.rn + k.recent <= coalesce(k.key_rate_limit, 2147483647))
         order by r.priority desc, r.run_at, r.id
         limit n
    ), ready as (
        select t.id, t.started_at from durable.tasks t join chosen using (id)
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
