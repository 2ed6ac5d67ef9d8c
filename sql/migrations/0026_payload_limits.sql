-- 0026: payload limits in SQL.
--
-- durable.start and durable.send_event stored arguments and event payloads of any size,
-- where the Python client refuses those over 16 MiB (codec.MAX_PAYLOAD) as JSON. They now
-- refuse them too, in one line naming the field (durable.check_payload).

-- Refuse a payload (a task's arguments, an event's) over 16 MiB as JSON, as a client
-- refuses it (codec.MAX_PAYLOAD), in one line naming the function and the field. It is
-- measured as the client measures it: JSON with no space after `,` and `:`, where jsonb's
-- text has one after each. A payload whose jsonb text is within the limit passes at once,
-- and one still over it with every ", " and ": " of that text discounted (those inside
-- strings too) is refused at once; only between the two are the spaces outside strings
-- counted exactly, by a regular expression (seconds for 16 MB).
create or replace function durable.check_payload(caller text, field text, value jsonb) returns void
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

create or replace function durable.send_event(task_id bigint, name text, payload jsonb default null,
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
