-- 0014: an event's idempotency key holds across a chain of runs (ctx.continue_as_new).
--
-- send_event checked the key against the events sent to the run it was given. An entity
-- workflow that took a keyed event and continued as new left the key on the run before:
-- a producer that resent the event to the chain's current run (found again by starting
-- with the chain's idempotency key) delivered it a second time. The check now walks back
-- the chain through continued_from.

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
