-- 0022: idle cost.
--
-- Every queue loop of a daemon polled on its own timer: a claim and a look for the next
-- due task per queue per poll interval, so an idle daemon serving 500 queues sent 200
-- statements a second. The daemon now polls once for all its queues with
-- durable.due_queues and wakes only the loops whose queues have work; a queue loop that
-- claimed nothing asks durable.next_due, the same look for its queue alone.

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
