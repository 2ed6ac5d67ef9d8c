-- Every function in schema durable runs with search_path = pg_catalog, pg_temp (the DO
-- block at the end), and what enters through SQL is checked where it enters.
--
-- A function runs with its caller's search_path unless it sets its own. The triggers run
-- with the path of whoever updates a task (an administrator cancelling from the command
-- line, a superuser's session) and call unnest, array_agg and pg_notify on domain-typed
-- and array values: a function planted in a schema on that path whose argument types
-- match better (public.unnest(text[]) against pg_catalog.unnest(anyarray)) ran in the
-- caller's name. Every table and function of durable is named with its schema, so the
-- path needs pg_catalog alone; pg_temp is named last so that no temporary object can
-- shadow a catalog one.
--
-- Generic over pg_proc rather than one ALTER per function: whatever an earlier migration
-- (re)created, with CREATE OR REPLACE that resets the setting, ends pinned.
--
-- Except durable.new_token(), called once per claimed row: a SET clause stops the planner
-- from inlining it (2.2 µs a call instead of 0.14 on PostgreSQL 15). Its body names every
-- function and operator with its schema instead, so that no search_path changes it.

create or replace function durable.new_token() returns bigint
language sql volatile parallel safe as $$
    select ((pg_catalog.random() operator(pg_catalog.*) 2147483648::double precision)::bigint
            operator(pg_catalog.<<) 31)
           operator(pg_catalog.#)
           (pg_catalog.random() operator(pg_catalog.*) 2147483648::double precision)::bigint
$$;

-- The SQL entry points refuse, in one line naming the argument, what used to pass them and
-- fail deeper (a column's check, an index row too large) or not at all (a NaN timeout, an
-- event name no workflow could wait for).

create or replace function durable.start(
    name text,
    args jsonb default '[]',
    kwargs jsonb default '{}',
    queue text default 'default',
    priority integer default 0,
    run_at timestamptz default null,
    max_attempts integer default 3,
    timeout double precision default null,
    idempotency_key text default null,
    kind text default 'task',
    concurrency_key text default null,
    key_limit integer default null
) returns bigint
language plpgsql
set search_path = pg_catalog, pg_temp as $$
#variable_conflict use_column
declare
    new_id bigint;
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
    if start.queue is null or length(start.queue) not between 1 and 200 then
        raise exception 'durable.start: queue must be 1 to 200 characters, got %',
            coalesce(length(start.queue) || ' characters', 'null') using errcode = '22023';
    end if;
    if start.kind is null or start.kind not in ('task', 'workflow') then
        raise exception 'durable.start: kind must be task or workflow, got %',
            coalesce(left(to_json(start.kind)::text, 60), 'null') using errcode = '22023';
    end if;
    if start.priority is null then
        raise exception 'durable.start: priority must be a whole number, got null'
            using errcode = '22023';
    end if;
    if start.max_attempts is null or start.max_attempts < 1 then
        raise exception 'durable.start: max_attempts must be at least 1, got %',
            coalesce(start.max_attempts::text, 'null') using errcode = '22023';
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
         idempotency_key, concurrency_key, key_limit)
    values
        (start.queue, start.name, start.kind, start.args, start.kwargs, start.priority,
         coalesce(start.run_at, now()), start.max_attempts, start.timeout,
         start.idempotency_key, start.concurrency_key, start.key_limit)
    on conflict (idempotency_key) where idempotency_key is not null
        do update set idempotency_key = excluded.idempotency_key
    returning t.id into new_id;
    return new_id;
end;
$$;

create or replace function durable.send_event(task_id bigint, name text, payload jsonb default null)
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
    select t.status into st from durable.tasks t where t.id = send_event.task_id for update;
    if st is null or st in ('completed', 'failed', 'cancelled') then
        return false;
    end if;
    insert into durable.signals (task_id, name, payload)
        values (send_event.task_id, send_event.name, send_event.payload);
    update durable.tasks t
       set status = 'queued', run_at = now(), wake_at = null, waiting_event = null
     where t.id = send_event.task_id and t.status = 'waiting'
       and t.waiting_event = send_event.name;
    return true;
end;
$$;

-- Queue limits and schedules that the claim and the scheduler can work with, whoever
-- writes them: a queue name that no task could carry, a rate period past a year (the
-- claim's `now() - period` leaves the range of a timestamp), a schedule whose task could
-- not be stored. A row that breaks them stops this migration; fix or delete it first.
alter table durable.queues
    add constraint queues_name_check check (length(name) between 1 and 200),
    add constraint queues_period_check check (rate_period <= 31536000);
alter table durable.schedules
    add constraint schedules_name_check check (
        length(name) between 1 and 200 and length(task_name) between 1 and 200
        and (queue is null or length(queue) between 1 and 200)),
    add constraint schedules_cron_check check (
        length(cron) between 1 and 200 and length(timezone) between 1 and 100),
    add constraint schedules_args_check check (
        jsonb_typeof(args) = 'array' and jsonb_typeof(kwargs) = 'object');

do $$
declare
    f regprocedure;
begin
    for f in
        select p.oid::regprocedure from pg_catalog.pg_proc p
         where p.pronamespace = 'durable'::regnamespace and p.prokind in ('f', 'p')
           and p.oid <> 'durable.new_token()'::regprocedure
         order by p.oid
    loop
        -- regprocedure prints the name and argument types quoted and schema-qualified.
        execute pg_catalog.format('alter routine %s set search_path = pg_catalog, pg_temp', f);
    end loop;
end;
$$;
