-- 0009: a task whose deadline passes while it is queued or waiting fails then, whether or
-- not a daemon serves it (each daemon's timer loop looks, by this index); the catalog
-- holds each definition's deadline and idempotency scope; and durable.start takes the
-- options client.start has: deadline, idempotency scope and debounce.

-- Only tasks with a deadline that have not started running enter it: the rest cost it
-- nothing.
create index tasks_deadline_idx on durable.tasks (deadline)
    where deadline is not null and status in ('queued', 'waiting');

-- What a start by name takes from the catalog besides the options it had.
alter table durable.definitions
    add column deadline double precision,
    add column idempotency text not null default 'forever',
    add constraint definitions_deadline_check check (deadline > 0),
    add constraint definitions_idempotency_check check (idempotency in ('forever', 'active'));

-- A new signature (five arguments more, with defaults): the old function goes, or a call
-- would match both. Explicit grants on it are carried over to the new one.
create temporary table durable_start_acl on commit drop as
    select proacl from pg_proc
     where oid = 'durable.start(text, jsonb, jsonb, text, integer, timestamptz, integer,
                   double precision, text, text, text, integer, boolean)'::regprocedure;
drop function durable.start(text, jsonb, jsonb, text, integer, timestamptz, integer,
                            double precision, text, text, text, integer, boolean);

-- Enqueue from SQL, inside the caller's transaction (a transactional outbox). The name is
-- resolved through the catalog (durable.definitions): the task gets its definition's
-- kind, queue, defaults and version, and the arguments given here override them. A name
-- no daemon ever published is refused unless a queue is given or allow_unknown is true.
-- deadline (seconds from now), idempotency ('forever' or 'active') and debounce,
-- debounce_key, max_delay mean what they mean to client.start.
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
       and not (start.deadline > '-infinity' and start.deadline < 10 * 365 * 86400) then
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
        -- As client.start(debounce=...): the queued task of the key, if any, takes these
        -- arguments and runs `debounce` seconds from now, never later than `max_delay`
        -- seconds after the first of its starts; else a new task.
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
            do update set args = excluded.args, kwargs = excluded.kwargs,
                          run_at = least(excluded.run_at, t.debounce_until)
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


do $$
declare
    item record;
begin
    for item in
        select a.grantee, a.privilege_type
          from durable_start_acl, aclexplode(proacl) a
         where a.privilege_type = 'EXECUTE'
    loop
        if item.grantee = 0 then
            continue;  -- PUBLIC: a new function is executable by it already
        end if;
        execute format('grant execute on function durable.start(text, jsonb, jsonb, text, '
                       'integer, timestamptz, integer, double precision, text, text, text, '
                       'integer, boolean, double precision, text, double precision, text, '
                       'double precision) to %I', item.grantee::regrole::text);
    end loop;
    if exists (select 1 from durable_start_acl where proacl is not null)
       and not exists (select 1 from durable_start_acl, aclexplode(proacl) a
                        where a.grantee = 0 and a.privilege_type = 'EXECUTE') then
        -- PUBLIC's execute had been revoked: so it stays.
        revoke execute on function durable.start(text, jsonb, jsonb, text, integer,
            timestamptz, integer, double precision, text, text, text, integer, boolean,
            double precision, text, double precision, text, double precision) from public;
    end if;
end;
$$;
