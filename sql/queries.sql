-- Every statement the store runs, by name: each section starts with `-- name: x`, and the
-- store parses the file once into a dict (durable.store.named_queries).

-- name: claim
-- Claim up to $3 ready tasks of queue $1 whose code this daemon has ($2), in priority
-- then age order, with a fresh claim token each and a lease of $4 seconds, within the
-- queue's fleet-wide limits (see durable.claim in schema.sql).
select * from durable.claim($1, $2::text[], $3, $4, $5)

-- name: trace_contexts
-- The stored trace contexts of claimed tasks; read only when tracing is on, so the claim
-- itself stays one statement.
select id, trace_context::text from durable.tasks
where id = any($1::bigint[]) and trace_context is not null

-- name: claim_delay
select durable.claim_delay($1)

-- name: next_due
-- When the next queued task of queue $1 that this daemon can run ($2) becomes due (see
-- durable.next_due in schema.sql).
select durable.next_due($1, $2::text[])

-- name: due_queues
-- The daemon's poll: the queues of $1 with work it can run ($2) due within $3 seconds,
-- and the seconds until then (see durable.due_queues in schema.sql).
select queue, wait from durable.due_queues($1::text[], $2::text[], $3)

-- name: extend_leases
-- The heartbeat: the tasks of $1 whose claim ($2) still holds, each with whether a cancel
-- was asked for (a daemon that missed the notification stops them at the next beat).
-- Rows locked by a statement in flight (this daemon's own completion of a large result,
-- a cancel) are reported held without waiting for them: a beat queued behind a long
-- completion would let the leases of the rows it has not reached yet expire.
with held as (
    select t.id, t.cancel_requested from durable.tasks t
      join unnest($1::bigint[], $2::bigint[]) as v(id, token) on t.id = v.id
     where t.id = any($1::bigint[]) and t.claim_token = v.token
), free as (
    select t.id from durable.tasks t
      join unnest($1::bigint[], $2::bigint[]) as v(id, token) on t.id = v.id
     where t.id = any($1::bigint[]) and t.claim_token = v.token
     for update of t skip locked
), extended as (
    update durable.tasks t
       set lease_until = now() + make_interval(secs => $3)
      from free
     where t.id = free.id
)
select id, cancel_requested from held

-- name: reap_expired
-- Leases that expired (their daemon died or froze): requeue, or fail when the attempts
-- are spent; a task whose cancellation was requested ends cancelled. The unfinished
-- descendants of those are locked first, newest first (see
-- durable.unfinished_descendants); the expired rows after them, never waited for: one
-- that another statement holds is left for the next pass, and so is one whose cancel
-- came after the rows were read.
with due as materialized (
    select t.id, t.cancel_requested as asked from durable.tasks t
    where t.status = 'running' and t.lease_until < now()
    order by t.lease_until
    limit 1000
), descendants as materialized (
    select array(select t.id from durable.tasks t
                  where t.id = any(coalesce(
                            (select durable.unfinished_descendants(array_agg(d.id))
                               from due d where d.asked having count(*) > 0), '{}'))
                  order by t.id desc
                    for update of t) as ids
), expired as materialized (
    -- (Joined with `descendants`: no row is locked before those are.)
    select t.id from descendants, durable.tasks t join due d on d.id = t.id
     where t.status = 'running' and t.lease_until < now()
       and (d.asked or not t.cancel_requested)
       for update of t skip locked
)
update durable.tasks t
   set status = case
           when t.cancel_requested then 'cancelled'
           when t.attempt < t.max_attempts then 'queued'
           else 'failed' end,
       attempt = case when t.attempt < t.max_attempts and not t.cancel_requested
                      then t.attempt + 1 else t.attempt end,
       run_at = now(),
       claim_token = null, lease_until = null, worker_id = null,
       error = case
           when t.cancel_requested then t.error
           else jsonb_build_object(
               'type', 'durable.LeaseExpired',
               'message', 'the lease expired: the daemon running attempt '
                          || t.attempt || ' stopped or lost its connection',
               'traceback', null) end,
       finished_at = case when t.cancel_requested or t.attempt >= t.max_attempts
                          then now() end
  from expired
 where t.id = expired.id
returning t.id, t.status

-- name: complete
-- Batch writes find their rows by primary key and fence on the claim token, which a task
-- holds exactly while it runs (tasks_claim_check). No status test: with one, the planner
-- may take the running tasks' partial index, whose dead entries grow with every finish.
-- A cancel that committed first wins: the task ends cancelled (and the status says so).
-- The rows are locked first, newest first (the order of durable.lock_trees): the update
-- takes them in whatever order its plan reads them, and two children of a workflow
-- finishing in one batch, the older taken first, deadlocked with a cancel of the workflow
-- (which holds the newer and waits for the older). With them, the unfinished descendants
-- of the tasks asked to cancel (see durable.unfinished_descendants). A batch without a
-- workflow takes complete_tasks.
with locked as materialized (
    select t.id from durable.tasks t
     where t.id = any($1::bigint[] || (
               select durable.unfinished_descendants(array_agg(a.id)) from durable.tasks a
                where a.id = any($1::bigint[]) and a.cancel_requested having count(*) > 0))
     order by t.id desc
       for update of t
)
update durable.tasks t
   set status = case when t.cancel_requested then 'cancelled' else 'completed' end,
       result = case when t.cancel_requested then null else v.result::jsonb end,
       error = null, finished_at = now(), claim_token = null, lease_until = null
  from unnest($1::bigint[], $2::bigint[], $3::text[]) as v(id, token, result)
 where t.id = any(array(select id from locked)) and t.id = v.id and t.claim_token = v.token
returning t.id, t.cancel_requested

-- name: complete_tasks
-- `complete` for plain tasks alone (no workflow among them): a plain task has no children,
-- so ending it cancelled cancels nothing else, and its rows are locked without the look
-- at whether it was asked to cancel (a completion of plain tasks, the hot path, pays
-- nothing for the workflows' trees).
with locked as materialized (
    select t.id from durable.tasks t where t.id = any($1::bigint[])
     order by t.id desc
       for update of t
)
update durable.tasks t
   set status = case when t.cancel_requested then 'cancelled' else 'completed' end,
       result = case when t.cancel_requested then null else v.result::jsonb end,
       error = null, finished_at = now(), claim_token = null, lease_until = null
  from unnest($1::bigint[], $2::bigint[], $3::text[]) as v(id, token, result)
 where t.id = any(array(select id from locked)) and t.id = v.id and t.claim_token = v.token
returning t.id, t.cancel_requested

-- name: retry_later
-- A failed attempt with attempts left: back to the queue after a delay; or cancelled when
-- a cancel was requested while it ran (its notification came too late to stop it). A
-- workflow's next attempt keeps its history but the failure that ended this attempt, as
-- `durable retry` does (see durable.restart): the events its error ($4) names under
-- `replay`, when nothing was recorded after the workflow saw them, children that failed,
-- were cancelled (or asked to stop) or were deleted before the workflow saw them, and a
-- patch marker the log would then end with (see durable.restart). Failures the workflow
-- handled stay, so its next attempt takes the same branches. Its row is locked first,
-- with its unfinished descendants when it was asked to cancel (see
-- durable.unfinished_descendants).
with locked as materialized (
    select t.id from durable.tasks t
     where t.id = any(array[$1::bigint] || (
               select durable.unfinished_descendants(array_agg(a.id)) from durable.tasks a
                where a.id = $1 and a.cancel_requested having count(*) > 0))
     order by t.id desc
       for update of t
), cleared as (
    delete from durable.events e
     using durable.tasks w
     where w.id = $1 and w.claim_token = $2 and w.status = 'running' and w.kind = 'workflow'
       and not w.cancel_requested and e.task_id = w.id and e.branch = w.branch
       and (((e.status = 'failed' or e.kind = 'sleep')
             and e.seq in (select p::integer from jsonb_array_elements_text(
                               $4::jsonb -> 'replay' -> 'positions') as p)
             and not exists (select 1 from durable.events x
                              where x.task_id = w.id and x.branch = w.branch
                                and x.seq >= ($4::jsonb -> 'replay' ->> 'at')::integer))
            or (e.kind = 'child' and e.status = 'pending'
                and not exists (select 1 from durable.tasks c
                                where c.id = e.child_id and not c.cancel_requested
                                  and c.status not in ('failed', 'cancelled'))))
    returning e.seq
), markers as (
    delete from durable.events m
     using durable.tasks w
     where w.id = $1 and w.claim_token = $2 and w.status = 'running' and w.kind = 'workflow'
       and not w.cancel_requested and m.task_id = w.id and m.branch = w.branch
       and m.kind = 'patch'
       and not exists (select 1 from durable.events x
                        where x.task_id = w.id and x.branch = w.branch and x.seq > m.seq
                          and x.kind <> 'patch' and x.seq not in (select seq from cleared))
)
update durable.tasks t
   set status = case when t.cancel_requested then 'cancelled' else 'queued' end,
       attempt = case when t.cancel_requested then t.attempt else t.attempt + 1 end,
       run_at = now() + make_interval(secs => $3), error = $4::jsonb,
       finished_at = case when t.cancel_requested then now() end,
       claim_token = null, lease_until = null, worker_id = null
 where t.id = any(array(select id from locked)) and t.id = $1 and t.claim_token = $2
   and t.status = 'running'
returning t.id

-- name: fail
-- A cancel that committed first wins: the task ends cancelled, its error kept. Its row is
-- locked first, with its unfinished descendants when it was asked to cancel (see
-- durable.unfinished_descendants).
with locked as materialized (
    select t.id from durable.tasks t
     where t.id = any(array[$1::bigint] || (
               select durable.unfinished_descendants(array_agg(a.id)) from durable.tasks a
                where a.id = $1 and a.cancel_requested having count(*) > 0))
     order by t.id desc
       for update of t
)
update durable.tasks t
   set status = case when t.cancel_requested then 'cancelled' else 'failed' end,
       error = $3::jsonb, finished_at = now(),
       claim_token = null, lease_until = null
 where t.id = any(array(select id from locked)) and t.id = $1 and t.claim_token = $2
   and t.status = 'running'
returning t.id

-- name: mark_cancelled
-- The task ends cancelled, and the update trigger cancels its descendants: its tree is
-- locked first, children before parents (see durable.unfinished_descendants).
with locked as materialized (
    select durable.lock_trees(array[$1::bigint])
)
update durable.tasks t
   set status = 'cancelled', finished_at = now(), claim_token = null, lease_until = null
  from locked
 where t.id = $1 and t.claim_token = $2 and t.status = 'running'
returning t.id

-- name: release
-- Shutdown: hand unfinished tasks back at once, without spending an attempt (a task whose
-- cancel was requested ends cancelled). The rows are locked as `complete`'s.
with locked as materialized (
    select t.id from durable.tasks t
     where t.id = any($1::bigint[] || (
               select durable.unfinished_descendants(array_agg(a.id)) from durable.tasks a
                where a.id = any($1::bigint[]) and a.cancel_requested having count(*) > 0))
     order by t.id desc
       for update of t
)
update durable.tasks t
   set status = case when t.cancel_requested then 'cancelled' else 'queued' end,
       finished_at = case when t.cancel_requested then now() end,
       run_at = now(), claim_token = null, lease_until = null, worker_id = null,
       suspend_token = null
  from unnest($1::bigint[], $2::bigint[]) as v(id, token)
 where t.id = any(array(select id from locked)) and t.id = v.id and t.claim_token = v.token
returning t.id

-- name: insert_task
-- A task without an idempotency key: a plain insert (an ON CONFLICT clause makes every
-- insert a speculative one, which costs about a seventh of an enqueue's round trip). The
-- casts give the parameters base types, not the columns' domains, which a client would
-- first have to look up.
insert into durable.tasks
    (queue, name, kind, args, kwargs, priority, run_at, max_attempts, timeout,
     concurrency_key, key_limit, key_rate_limit, key_rate_period, trace_context, version,
     deadline)
values ($1::text, $2::text, $3::text, $4::jsonb, $5::jsonb, $6, coalesce($7, now()),
        $8::integer, $9::float8, $10, $11::integer, $12::integer, $13::float8, $14::jsonb,
        $15::text, now() + make_interval(secs => $16::float8))
returning id

-- name: insert_task_keyed
-- The same with an idempotency key ($16): the task already started with it, if any.
insert into durable.tasks as t
    (queue, name, kind, args, kwargs, priority, run_at, max_attempts, timeout,
     concurrency_key, key_limit, key_rate_limit, key_rate_period, trace_context, version,
     deadline, idempotency_key)
values ($1::text, $2::text, $3::text, $4::jsonb, $5::jsonb, $6, coalesce($7, now()),
        $8::integer, $9::float8, $10, $11::integer, $12::integer, $13::float8, $14::jsonb,
        $15::text, now() + make_interval(secs => $16::float8), $17)
on conflict (idempotency_key) where idempotency_key is not null
    do update set idempotency_key = excluded.idempotency_key
returning t.id, (t.xmax = 0) as inserted

-- name: insert_many
insert into durable.tasks (queue, name, kind, args, kwargs, priority, run_at, max_attempts,
                           timeout, concurrency_key, key_limit, key_rate_limit,
                           key_rate_period, trace_context, version, deadline)
select v.queue, v.name, v.kind, v.args::jsonb, v.kwargs::jsonb, v.priority,
       coalesce(v.run_at, now()), v.max_attempts, v.timeout, v.ckey, v.klimit, v.krate,
       v.kperiod, v.trace_context::jsonb, v.version, now() + make_interval(secs => v.deadline)
  from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int[],
              $7::timestamptz[], $8::int[], $9::float8[], $10::text[], $11::int[],
              $12::int[], $13::float8[], $14::text[], $15::text[], $16::float8[])
       with ordinality as v(queue, name, kind, args, kwargs, priority, run_at, max_attempts,
                            timeout, ckey, klimit, krate, kperiod, trace_context, version,
                            deadline,
                            ord)
 order by v.ord
returning id

-- name: insert_uniform
-- start_many's usual case: tasks alike but for their arguments, which alone go as arrays
-- (a client checks every element of every array it sends). $5 null: no keyword arguments.
insert into durable.tasks (queue, name, kind, args, kwargs, priority, run_at, max_attempts,
                           timeout, trace_context, version, deadline)
select $1::text, $2::text, $3::text, v.args::jsonb, coalesce(v.kwargs, '{}')::jsonb,
       $6::integer, coalesce($7::timestamptz, now()), $8::integer, $9::float8, $10::jsonb,
       $11::text, now() + make_interval(secs => $12::float8)
  from unnest($4::text[], $5::text[]) with ordinality as v(args, kwargs, ord)
 order by v.ord
returning id

-- name: get_task
select id, queue, name, kind, args::text, kwargs::text, status, priority, run_at, attempt,
       max_attempts, timeout, lease_until, worker_id, result::text, error::text,
       idempotency_key, parent_id, root_id, branch, wake_at, waiting_on, waiting_event,
       cancel_requested, created_at, started_at, finished_at, version, deadline
from durable.tasks where id = $1

-- name: list_tasks
select id, queue, name, kind, status, priority, attempt, max_attempts, parent_id,
       created_at, started_at, finished_at, run_at, version
from durable.tasks
where ($1::text is null or status = $1)
  and ($2::text is null or queue = $2)
  and ($3::text is null or name = $3)
  and ($4::timestamptz is null or created_at >= $4)
order by id desc
limit $5

-- name: watch_finish
-- Ask for a `durable_done` notification when the task finishes; returns its status.
update durable.tasks set notify_finish = true where id = $1
returning status, result::text, error::text, continued_as

-- name: cancel
-- Cancel tasks and every unfinished descendant (see durable.cancel in schema.sql).
select id, status, already_finished from durable.cancel($1::bigint[])

-- name: register_worker
insert into durable.workers (id, host, pid, queues, names) values ($1, $2, $3, $4::jsonb, $5)

-- name: worker_heartbeat
-- Also the database's clock, to measure this process's offset from it.
update durable.workers set heartbeat_at = now() where id = $1 returning clock_timestamp()

-- name: clock
select clock_timestamp()

-- name: worker_stopped
update durable.workers set stopped_at = now(), heartbeat_at = now() where id = $1

-- name: list_workers
select id, host, pid, queues::text, names, started_at, heartbeat_at, stopped_at,
       now() - heartbeat_at as silence
from durable.workers order by started_at desc limit $1

-- name: queue_stats
select queue, status, count(*)::bigint,
       min(run_at) filter (where status = 'queued' and run_at <= now()) as oldest_ready
from durable.tasks group by queue, status order by queue, status

-- name: wake_timers
-- Wake suspended workflows whose timer (sleep or event timeout) is due.
update durable.tasks
   set status = 'queued', run_at = now(), wake_at = null, waiting_on = null,
       waiting_event = null
 where id in (select id from durable.tasks
              where status = 'waiting' and wake_at <= now()
              order by wake_at limit 1000
              for update skip locked)
returning id

-- name: timer_wait
-- Seconds until the next timer is due, or the next deadline of a task not yet running,
-- on the database's clock (zero or less: due now); null with neither. What wake_timers
-- and expire_deadlines look for, in two index probes: they run only once it is due.
select extract(epoch from least(
           (select min(wake_at) from durable.tasks where status = 'waiting'),
           (select min(deadline) from durable.tasks
             where deadline is not null and status in ('queued', 'waiting'))) - now())::float8

-- name: expire_deadlines
-- Tasks whose deadline passed before they ran again: nobody serves them, none of their
-- daemons had a slot, or they wait (a workflow is woken at its deadline, but only a claim
-- would fail it). They end as the runner ends a task past its deadline: failed with
-- DeadlineExceeded (cancelled if a cancel came first), their unfinished descendants
-- cancelled. A task a claim took meanwhile is left alone (the update checks the status
-- again once the row is locked): its runner fails it.
-- Their trees are locked first, children before parents (durable.lock_trees): locking a
-- waiting workflow and then its children deadlocked with a child finishing, which locks
-- its own row and then its waiting parent's.
with candidates as materialized (
    select array(select id from durable.tasks
                  where deadline <= now() and status in ('queued', 'waiting')
                  order by deadline limit 1000) as ids
), locked as materialized (
    select c.ids, durable.lock_trees(c.ids) from candidates c
), due as (
    -- The message the runner writes: the deadline in ISO 8601, as Python prints it.
    select t.id, 'the deadline '
               || to_char(t.deadline at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
               || case when extract(microseconds from t.deadline)::bigint % 1000000 = 0
                       then '' else to_char(t.deadline at time zone 'UTC', '.US') end
               || '+00:00 passed' as message
      from durable.tasks t, locked l
     where t.id = any(l.ids)
), failed as (
    update durable.tasks t
       set status = case when t.cancel_requested then 'cancelled' else 'failed' end,
           error = jsonb_build_object(
               'type', 'durable.errors.DeadlineExceeded', 'message', due.message,
               'traceback', 'durable.errors.DeadlineExceeded: ' || due.message || E'\n',
               'args', jsonb_build_array(due.message), 'attrs', '{}'::jsonb),
           finished_at = now(), wake_at = null, waiting_on = null, waiting_event = null
      from due
     where t.id = due.id and t.deadline <= now() and t.status in ('queued', 'waiting')
    returning t.id, t.name, t.status
)
select f.id, f.name, f.status,
       (select count(*) from durable.cancel_descendants(array(select id from failed))) as cancelled
  from failed f

-- name: resume_events
-- A claimed workflow's cold start: its event log, once patch markers the log ends with are
-- dropped (under claim $3). A marker recorded just before the daemon died was answered
-- by an attempt that recorded nothing after it: code from before the patch, stepping over
-- it, would record its own branch behind it, a log that code with the patch cannot
-- replay. Dropped, the marker is asked for again by whichever code runs next. (The
-- select reads the snapshot from before the delete: it leaves out what was dropped.)
with dropped as (
    delete from durable.events m
     using durable.tasks w
     where w.id = $1 and w.claim_token = $3 and m.task_id = w.id and m.branch = $2
       and m.kind = 'patch'
       and not exists (select 1 from durable.events x
                        where x.task_id = w.id and x.branch = $2 and x.seq > m.seq
                          and x.kind <> 'patch')
    returning m.seq
)
select e.seq, e.kind, e.name, e.digest, e.status, e.result::text, e.error::text, e.child_id,
       e.wake_at, c.status as child_status, c.result::text as child_result,
       c.error::text as child_error
from durable.events e left join durable.tasks c on c.id = e.child_id
where e.task_id = $1 and e.branch = $2 and e.seq not in (select seq from dropped)
order by e.seq

-- name: load_events
select e.seq, e.kind, e.name, e.digest, e.status, e.result::text, e.error::text, e.child_id,
       e.wake_at, c.status as child_status, c.result::text as child_result,
       c.error::text as child_error
from durable.events e left join durable.tasks c on c.id = e.child_id
where e.task_id = $1 and e.branch = $2
order by e.seq

-- name: checkpoint
-- Group-committed checkpoints of many workflows, one durable.checkpoint_epoch_row each;
-- returns the rows not written: a row whose claim token no longer matches (a zombie) or
-- whose position is taken. Usually none, so nothing comes back to decode. A plain insert
-- behind NOT EXISTS, not ON CONFLICT: a speculative insert writes one WAL record more per
-- event (four instead of three), and no concurrent insert can race this one for a position: the fence admits only the claim that holds the
-- task, and that claim writes each position once.
with v as (
    select * from unnest($1::durable.checkpoint_epoch_row[])
), fence as (
    -- FOR SHARE waits for a concurrent reclaim and then sees its new token. Newest first,
    -- the order of durable.lock_trees (see `complete`): a cancel of a workflow whose
    -- children checkpoint together holds the newer child and waits for the older.
    select t.id, t.claim_token from durable.tasks t
    where t.id = any(array(select v.task_id from v)) and t.claim_token is not null
    order by t.id desc
    for share of t
), written as (
    insert into durable.events as e
        (task_id, branch, seq, kind, name, digest, status, result, error, wake_at, attempt,
         started_at, finished_at)
    select v.task_id, v.branch, v.seq, v.kind, v.name, v.digest, v.status, v.result::jsonb,
           v.error::jsonb, to_timestamp(v.wake_at), v.attempt, to_timestamp(v.started_at),
           case when v.status = 'pending' then null else now() end
      from v
      join fence f on f.id = v.task_id and f.claim_token = v.token
     where not exists (select 1 from durable.events x
                        where x.task_id = v.task_id and x.branch = v.branch and x.seq = v.seq)
    returning e.task_id, e.seq
)
select v.task_id, v.seq from v
 where not exists (select 1 from written w where w.task_id = v.task_id and w.seq = v.seq)

-- name: fence_lock
-- Lock the task row for a write made in the same transaction (transactional steps,
-- children); no row means the claim was lost. Whether a cancel was asked for: a
-- workflow being cancelled starts no more children. The lease is renewed for $3 seconds
-- from now (not from the transaction's start): while the row is locked, until the commit
-- ends (deferred triggers, a lock the commit waits for), heartbeats pass it by, and a
-- lease that ran out meanwhile was reaped the moment the lock went, the attempt still
-- running (see also renew_lease).
update durable.tasks
   set lease_until = greatest(lease_until, clock_timestamp() + make_interval(secs => $3))
where id = $1 and claim_token = $2 and status = 'running'
returning cancel_requested

-- name: renew_lease
-- A fenced transaction's commit outlasted a heartbeat's interval: renew the lease the
-- heartbeat could not (it passes locked rows by), waiting for the commit's lock.
update durable.tasks
   set lease_until = greatest(lease_until, clock_timestamp() + make_interval(secs => $3))
where id = $1 and claim_token = $2 and status = 'running'

-- name: insert_event
insert into durable.events
    (task_id, branch, seq, kind, name, digest, status, result, error, child_id, signal_id,
     wake_at, attempt, started_at, finished_at)
values ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9::jsonb, $10, $11, $12, $13,
        to_timestamp($14::double precision), case when $7 = 'pending' then null else now() end)

-- name: insert_children
insert into durable.tasks (queue, name, kind, args, kwargs, priority, max_attempts, timeout,
                           parent_id, root_id, concurrency_key, key_limit, key_rate_limit,
                           key_rate_period, trace_context, version, deadline)
select v.queue, v.name, v.kind, v.args::jsonb, v.kwargs::jsonb, v.priority, v.max_attempts,
       v.timeout, $10, $11, v.ckey, v.klimit, v.krate, v.kperiod, v.trace_context::jsonb,
       v.version, now() + make_interval(secs => v.deadline)
  from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int[],
              $7::int[], $8::float8[], $9::int[], $12::text[], $13::int[], $14::int[],
              $15::float8[], $16::text[], $17::text[], $18::float8[])
       as v(queue, name, kind, args, kwargs, priority, max_attempts, timeout, ord, ckey,
            klimit, krate, kperiod, trace_context, version, deadline)
 order by v.ord
returning id

-- name: insert_child_events
insert into durable.events
    (task_id, branch, seq, kind, name, digest, status, child_id, attempt)
select $1, $2, v.seq, 'child', v.name, v.digest, 'pending', v.child_id, $3
  from unnest($4::int[], $5::text[], $6::text[], $7::bigint[]) as v(seq, name, digest, child_id)

-- name: record_children
-- The outcomes a parent saw of its children ($4 seqs, $5 statuses, $6 results, $7 errors),
-- written into its own log under its claim: a child restarted later cannot change them.
-- Returns whether the claim still held.
-- Each event is found by its whole key, one probe per outcome, in a lateral subquery that
-- OFFSET 0 keeps from being flattened: joined on seq alone, a cached generic plan, which
-- takes a workflow for one of a few events, read the parent's whole log and compared every
-- outcome with every event (a gather of 2,000 children took 9 s in that one statement,
-- holding the parent's row).
with fence as (
    select t.id from durable.tasks t
    where t.id = $1 and t.claim_token = $2 and t.status = 'running'
    for update
), recorded as (
    update durable.events e
       set status = x.status, result = x.result::jsonb, error = x.error::jsonb,
           finished_at = now()
      from (select v.status, v.result, v.error, p.tid
              from unnest($4::int[], $5::text[], $6::text[], $7::text[])
                       as v(seq, status, result, error),
                   lateral (select p.ctid as tid from durable.events p
                             where p.task_id = $1 and p.branch = $3 and p.seq = v.seq
                            offset 0) p) x
     where e.ctid = x.tid and e.kind = 'child' and e.status = 'pending'
       and exists (select 1 from fence)
    returning 1
)
select exists (select 1 from fence)

-- name: child_events
-- The events at positions $3 of branch $2 of task $1, with their children's states: a
-- gather of handles spawned earlier looks whether their children finished before it
-- suspends. One probe by the whole key per position (see record_children).
select e.seq, e.kind, e.name, e.digest, e.status, e.result::text, e.error::text,
       e.child_id, e.wake_at, c.status as child_status, c.result::text as child_result,
       c.error::text as child_error
  from unnest($3::int[]) as s(seq),
       lateral (select * from durable.events p
                 where p.task_id = $1 and p.branch = $2 and p.seq = s.seq
                offset 0) e
  left join durable.tasks c on c.id = e.child_id

-- name: suspend
select durable.suspend($1, $2, $3, $4::bigint[], $5, $6)

-- name: take_signal
-- The oldest event named $3 sent to task $1 that branch $2 has not consumed yet.
-- (A subquery: evaluated once, where a bare call may be evaluated for every row scanned.)
select s.id, s.payload::text from durable.signals s
where s.id = (select durable.next_signal($1, $2, $3))

-- name: send_event
select durable.send_event($1, $2, $3::jsonb, $4::text)

-- name: set_queue_paused
-- `durable queues pause` / `resume`: claims of the queue stop or go on, fleet-wide. A
-- pause tells the daemons serving the queue to hand back what they claimed ahead and have
-- not started (then waits at pause_barrier); a resume wakes them at once.
with q as (
    insert into durable.queues as c (name, paused, updated_at) values ($1, $2, now())
    on conflict (name) do update set paused = excluded.paused, updated_at = now()
    returning c.name, c.paused
)
select pg_notify(case when q.paused then 'durable_control' else 'durable_ready' end,
                 case when q.paused then 'pause:' || q.name else q.name end)
  from q

-- name: pause_barrier
-- Once the pause of queue $1 has committed: waits until the claims that may have read the
-- queue unpaused have ended (each holds this lock shared, see durable.claim), so that no
-- claim takes a task after the pause returns. Its own transaction, after the flag's: a
-- claim waiting for a limited queue's lock meanwhile then sees the flag and gives up,
-- rather than take tasks while the pause waits for it.
select pg_advisory_xact_lock(hashtextextended('durable.pause:' || $1::text, 0))

-- name: insert_task_active
-- A task with an idempotency key of scope "active" ($17): the unfinished task started
-- with it, if any; once that one has finished, a new task.
insert into durable.tasks as t
    (queue, name, kind, args, kwargs, priority, run_at, max_attempts, timeout,
     concurrency_key, key_limit, key_rate_limit, key_rate_period, trace_context,
     version, deadline, active_key)
values ($1::text, $2::text, $3::text, $4::jsonb, $5::jsonb, $6, coalesce($7, now()),
        $8::integer, $9::float8, $10, $11::integer, $12::integer, $13::float8, $14::jsonb,
        $15::text, now() + make_interval(secs => $16::float8), $17)
on conflict (active_key) where active_key is not null and status in ('queued', 'running', 'waiting')
    do update set active_key = excluded.active_key
returning t.id, (t.xmax = 0) as inserted

-- name: history
select e.seq, e.kind, e.name, e.status, e.result::text, e.error::text, e.child_id,
       e.wake_at, e.attempt, e.started_at, e.finished_at, c.status as child_status
from durable.events e left join durable.tasks c on c.id = e.child_id
where e.task_id = $1 and e.branch = $2
order by e.seq

-- name: branches
select distinct branch from durable.events where task_id = $1 order by branch

-- name: restart
select durable.restart($1, $2, $3)

-- name: queue_limits
select name, concurrency, rate_limit, rate_period, updated_at, paused
from durable.queues order by name

-- name: set_queue_limits
-- $5, $6: whether to set the concurrency and the rate; a limit not set keeps its value
-- (`durable queues set Q --rate 20/1s` leaves Q's concurrency limit alone).
insert into durable.queues as c (name, concurrency, rate_limit, rate_period, updated_at)
values ($1, case when $5::boolean then $2::integer end,
        case when $6::boolean then $3::integer end,
        case when $6::boolean then $4::double precision end, now())
on conflict (name) do update
   set concurrency = case when $5::boolean then excluded.concurrency else c.concurrency end,
       rate_limit = case when $6::boolean then excluded.rate_limit else c.rate_limit end,
       rate_period = case when $6::boolean then excluded.rate_period else c.rate_period end,
       updated_at = now()
returning name

-- name: upsert_schedule
-- A schedule declared in code: (re)declared by every daemon at startup; its next run is
-- kept unless the cron expression or time zone changed. A row is rewritten only from the
-- side that wrote it ($10: or by `schedules add --override-code`), so a daemon keeps a
-- schedule added from the command line under its name, and the command line cannot
-- silently take over one declared in code. No row returned: not written.
insert into durable.schedules as s
    (name, task_name, cron, timezone, args, kwargs, queue, source, next_run_at)
values ($1, $2, $3, $4, $5::jsonb, $6::jsonb, $7, $8, $9)
on conflict (name) do update
   set task_name = excluded.task_name, args = excluded.args, kwargs = excluded.kwargs,
       queue = excluded.queue, source = excluded.source,
       next_run_at = case when (s.cron, s.timezone) is distinct from
                               (excluded.cron, excluded.timezone)
                          then excluded.next_run_at else s.next_run_at end,
       cron = excluded.cron, timezone = excluded.timezone
 where s.source = excluded.source or $10::boolean
returning name

-- name: forget_code_schedules
-- Schedules once declared in code by definitions that now declare none: they stop. A
-- schedule added from the command line under such a name stays.
delete from durable.schedules where name = any($1::text[]) and source = 'code'
returning name

-- name: delete_schedule
delete from durable.schedules where name = $1 returning name

-- name: list_schedules
select name, task_name, cron, timezone, args::text, kwargs::text, queue, source,
       next_run_at, last_run_at, last_task_id
from durable.schedules order by name

-- name: due_schedules
select name, task_name, cron, timezone, args::text, kwargs::text, queue, next_run_at
from durable.schedules where next_run_at <= $1 order by next_run_at

-- name: next_schedule
-- Leaving out the schedules a daemon skips ($1: their rows hold what it cannot use).
select min(next_run_at) from durable.schedules where not (name = any($1::text[]))

-- name: advance_schedule
-- Compare-and-set: only the daemon that still sees the old next run moves it on.
update durable.schedules set next_run_at = $3, last_run_at = $4
where name = $1 and next_run_at = $2
returning name

-- name: schedule_task_started
update durable.schedules set last_task_id = $2 where name = $1

-- name: ping
select 1

-- name: schema_version
select max(version) from durable.migrations

-- name: schema_holds_objects
-- `durable migrate` on a schema with no migration recorded: whether it holds anything but
-- the table of migrations (then the record was lost, and 0001 must not run over it).
select exists (select from pg_class c
                where c.relnamespace = 'durable'::regnamespace
                  and c.relname not in ('migrations', 'migrations_pkey'))
    or exists (select from pg_proc p where p.pronamespace = 'durable'::regnamespace)
    or exists (select from pg_type t
                where t.typnamespace = 'durable'::regnamespace and t.typtype in ('d', 'e'))

-- name: missing_tables
-- Those of the tables $1 (the latest schema's) that the database lacks.
select t from unnest($1::text[]) t
 where to_regclass(format('durable.%I', t)) is null

-- name: queue_depth
-- Unfinished tasks per queue, and how long the oldest ready one has waited (seconds).
-- Reads only the partial indexes on queued, running and waiting tasks, not the history.
select queue,
       count(*) filter (where status = 'queued')::bigint as queued,
       count(*) filter (where status = 'running')::bigint as running,
       count(*) filter (where status = 'waiting')::bigint as waiting,
       extract(epoch from now() - min(run_at) filter (where status = 'queued'
                                                        and run_at <= now()))::float8
           as oldest_ready
from durable.tasks
where status in ('queued', 'running', 'waiting')
group by queue

-- name: paused_queues
select name from durable.queues where paused order by name

-- name: table_health
-- durable.tasks's dead row versions awaiting VACUUM (the statistics' estimate) and the
-- seconds since it was last vacuumed, by autovacuum or by hand (null: never). Readable
-- by any role.
select n_dead_tup::bigint as dead,
       extract(epoch from now() - greatest(last_vacuum, last_autovacuum))::float8
           as vacuum_age
from pg_stat_user_tables where schemaname = 'durable' and relname = 'tasks'

-- name: unserved_names
-- Per queue, the names of queued tasks that no live daemon ($1: heard from within this
-- many seconds) serves: it must list the queue and have the code for the name, and for a
-- versioned task that version's (shown as name@version).
with pending as (
    select queue, name, version, count(*)::bigint as tasks
    from durable.tasks where status = 'queued' group by queue, name, version
)
select p.queue,
       array_agg(p.name || coalesce('@' || p.version, '') order by p.name, p.version) as names,
       sum(p.tasks)::bigint as tasks
from pending p
where not exists (
    select 1 from durable.workers w
    where w.stopped_at is null and w.heartbeat_at > now() - make_interval(secs => $1)
      and w.queues ? p.queue and p.name = any(w.names)
      and (p.version is null or exists (
              select 1 from durable.worker_definitions d
               where d.worker_id = w.id and d.name = p.name and d.version = p.version)))
group by p.queue
order by p.queue

-- name: select_tasks
-- Ids of the tasks a bulk retry or cancel acts on: status in $1, optional queue $2, name
-- $3, created since $4; $5 leaves out tasks already asked to cancel.
select id from durable.tasks
where status = any($1::text[])
  and ($2::text is null or queue = $2)
  and ($3::text is null or name = $3)
  and ($4::timestamptz is null or created_at >= $4)
  and not ($5 and cancel_requested)
order by id

-- name: retry_many
-- `durable.restart(id, 'retry')` for the tasks of $1 still in a status of $2. Their trees are
-- locked first, children before parents (durable.lock_trees): one task at a time, its row
-- and then (durable.restart) its children's, a retry picking a workflow and its child held
-- the workflow and wanted the grandchild, while a cancel of the workflow held the
-- grandchild and waited for a row the retry had taken. Each row is checked again once
-- locked (FOR UPDATE reads its latest version), so one retried meanwhile by someone else
-- is skipped, not an error.
-- A child whose parent has recorded its outcome is left alone: running it again could not
-- change what the parent saw (retrying the parent runs again the child that ended it).
-- Of tasks sharing an idempotency key of scope "active", the newest alone: once it is
-- retried the key is held, and durable.restart would refuse the next (and with it the
-- whole statement).
with candidates as materialized (
    select array(select t.id from durable.tasks t
                  where t.id = any($1::bigint[]) and t.status = any($2::text[])
                  order by t.id) as ids
), locked as materialized (
    select c.ids, durable.lock_trees(c.ids) from candidates c
), picked as materialized (
    select t.id, t.active_key from durable.tasks t, locked l
    where t.id = any(l.ids) and t.status = any($2::text[])
      -- Nor what durable.restart refuses: a run that continued as new, a task whose
      -- deadline passed, a task whose idempotency key of scope "active" another
      -- unfinished task holds now.
      and t.continued_as is null
      and (t.deadline is null or t.deadline > now())
      and not (t.active_key is not null
               and exists (select 1 from durable.tasks o
                            where o.active_key = t.active_key and o.id <> t.id
                              and o.status in ('queued', 'running', 'waiting')))
      and not (t.parent_id is not null
               and exists (select 1 from durable.events e
                           where e.child_id = t.id and e.status <> 'pending'))
    order by t.id
    for update of t
)
select p.id, durable.restart(p.id, 'retry') as branch from picked p
 where not exists (select 1 from picked q where q.active_key = p.active_key and q.id > p.id)

-- name: prune_try_lock
-- One pruner at a time across all daemons and CLIs ($1 is PRUNE_LOCK): taken by each of
-- a pass's statements in its own transaction, so that it never outlives one, even on a
-- server connection shared through a transaction pooler.
select pg_try_advisory_xact_lock($1)

-- name: prune_count
-- How many tasks `prune_trees` would delete for cutoff $1 (for the confirmation prompt).
select count(*)::bigint from durable.tasks t
where t.status in ('completed', 'failed', 'cancelled') and t.finished_at < $1
  and not exists (
      select 1 from durable.tasks r where r.id = t.root_id
         and (r.status in ('completed', 'failed', 'cancelled') and r.finished_at < $1)
             is not true)
  and not exists (
      select 1 from durable.tasks d where d.root_id = coalesce(t.root_id, t.id)
         and (d.status in ('completed', 'failed', 'cancelled') and d.finished_at < $1)
             is not true)

-- name: prune_scan
-- One window of up to $3 tasks after id $1, in id order. A task is pruned with its whole
-- tree (its root, coalesce(root_id, id), and every task with that root), and only when
-- every task of the tree finished before $2. Returns the last id looked at, how many rows
-- the window held, whether any was created before $2 (none: the rest is newer, stop), and
-- the roots of the trees ready to go.
with win as (
    select id, root_id, status, finished_at, created_at from durable.tasks
    where id > $1 order by id limit $3
), keys as (
    select distinct coalesce(w.root_id, w.id) as k from win w
    where w.status in ('completed', 'failed', 'cancelled') and w.finished_at < $2
)
select (select max(id) from win) as last_id,
       (select count(*) from win)::int as scanned,
       coalesce((select bool_or(created_at < $2) from win), false) as older,
       array(
           select k.k from keys k
           where not exists (
                   select 1 from durable.tasks r where r.id = k.k
                      and (r.status in ('completed', 'failed', 'cancelled')
                           and r.finished_at < $2) is not true)
             and not exists (
                   select 1 from durable.tasks d where d.root_id = k.k
                      and (d.status in ('completed', 'failed', 'cancelled')
                           and d.finished_at < $2) is not true)
           order by k.k) as roots

-- name: prune_trees
-- Delete up to $3 tasks of the trees rooted at $1 (with their events and signals),
-- descendants first; a root goes in the statement after its last descendant. The tasks to
-- delete and their trees' roots are locked first, newest first (children before parents,
-- the order of durable.lock_trees), and each tree is checked again under those locks: a
-- tree with a task restarted meanwhile is left alone, whole. Locking the root first and
-- then deleting its descendants deadlocked with a cancel or a retry of a child restarted
-- meanwhile (children first: they held the child and waited for the root).
-- A root already gone (deleted by hand) leaves its descendants to be pruned all the same.
-- Every table is reached by its keys (= any(array), a lateral lookup per root), never
-- joined: with autovacuum off nothing analyzes these tables, and a join planned without
-- statistics read the whole table for each batch (a backward scan of the primary key
-- filtered against every root: 40 million comparisons for 1,000 tasks among 40,000).
with allowed as materialized (
    select keys.k from unnest($1::bigint[]) as keys (k)
    where not exists (
              select 1 from durable.tasks r where r.id = keys.k
                 and (r.status in ('completed', 'failed', 'cancelled') and r.finished_at < $2)
                     is not true)
      and not exists (
          select 1 from durable.tasks d where d.root_id = keys.k
             and (d.status in ('completed', 'failed', 'cancelled') and d.finished_at < $2)
                 is not true)
), picked as materialized (
    -- Newest first: a task's descendants are newer than it, so none is left behind
    -- under a deleted parent.
    (select d.id from allowed a
       -- OFFSET 0 keeps the lookup per root: flattened, it became the scan above.
       cross join lateral (select d.id from durable.tasks d where d.root_id = a.k
                           offset 0) d
      order by d.id desc limit $3)
    union all
    (select a.k from allowed a
      where not exists (select 1 from durable.tasks d where d.root_id = a.k))
), locked as materialized (
    -- FOR UPDATE reads each row's latest version: `old` is what it is now.
    select t.id, coalesce(t.root_id, t.id) as root,
           (t.status in ('completed', 'failed', 'cancelled') and t.finished_at < $2) as old
      from durable.tasks t
     where t.id = any(array(select p.id from picked p union select a.k from allowed a))
     order by t.id desc
       for update of t
), victims as materialized (
    select l.id from locked l
     where l.id = any(array(select p.id from picked p))
       and not l.root = any(array(select s.root from locked s where s.old is not true))
), gone as (
    -- (The status again, though `locked` checked it under the lock: nothing unfinished
    -- is ever deleted.)
    delete from durable.tasks t where t.id = any(array(select id from victims))
       and t.status in ('completed', 'failed', 'cancelled')
    returning t.id
), ev as (
    delete from durable.events e where e.task_id = any(array(select id from gone))
    returning 1
), sg as (
    delete from durable.signals s where s.task_id = any(array(select id from gone))
    returning 1
)
select (select count(*) from gone)::bigint as tasks,
       (select count(*) from ev)::bigint as events,
       (select count(*) from sg)::bigint as signals

-- name: prune_workers
-- Daemons stopped before $1, or silent since before $1 and for more than a day (lost).
delete from durable.workers
where (stopped_at is not null and stopped_at < $1)
   or (stopped_at is null and heartbeat_at < least($1, now() - interval '1 day'))
returning id

-- name: vacuum_check
-- Whether a prune pass in vacuum mode $1 ('on', 'auto': when the server's autovacuum is
-- off) vacuums, and whether this role may: VACUUM skips, with only a warning, a table
-- its role does not own (PostgreSQL 17 also lets the MAINTAIN privilege do it).
select $1::text = 'on' or ($1::text = 'auto' and not current_setting('autovacuum')::boolean)
           as wanted,
       bool_and(pg_has_role(c.relowner, 'USAGE')
                or pg_has_role((select d.datdba from pg_database d
                                 where d.datname = current_database()), 'USAGE')
                or (select r.rolsuper from pg_roles r where r.rolname = current_user)
                or case when current_setting('server_version_num')::integer >= 170000
                        then has_table_privilege(c.oid, 'MAINTAIN') else false end)
           as allowed
  from pg_class c
 where c.oid in ('durable.tasks'::regclass, 'durable.events'::regclass,
                 'durable.signals'::regclass)

-- name: prune_cutoff
-- The database's clock decides what is old, not the caller's.
select now() - make_interval(secs => $1)

-- name: grant_statements
-- `durable migrate --grant ROLE`: what the daemon and clients need, and nothing more —
-- usage (not create) on the schema, read and write on the tables but only read on the
-- migrations, usage on the sequences, execute on the functions. Identifiers are quoted
-- by format('%I'), so any role name stays one identifier.
select format('grant usage on schema durable to %I', $1::text) as statement
union all
select format('grant select on table durable.migrations to %I', $1::text)
union all
(select format('grant select, insert, update, delete on table %I.%I to %I',
               t.schemaname, t.tablename, $1::text)
   from pg_tables t
  where t.schemaname = 'durable' and t.tablename <> 'migrations'
  order by t.tablename)
union all
(select format('grant usage on sequence %I.%I to %I', s.schemaname, s.sequencename, $1::text)
   from pg_sequences s
  where s.schemaname = 'durable'
  order by s.sequencename)
union all
(select format('grant execute on function %s to %I', p.oid::regprocedure, $1::text)
   from pg_proc p
  where p.pronamespace = 'durable'::regnamespace
  order by p.proname, p.oid)

-- name: now
-- The database's clock, within the statement's transaction.
select now()

-- name: settle_wait
-- A wait_for_event recorded earlier, settled: the signal's payload, or a timeout.
update durable.events set status = $4, result = $5::jsonb, signal_id = $6, finished_at = now()
 where task_id = $1 and branch = $2 and seq = $3

-- The catalog of definitions (durable/catalog.py) ---------------------------------------

-- name: register_definitions
-- What daemon $1 serves ($2: durable.catalog.publication), once, as it starts.
insert into durable.worker_definitions (worker_id, name, version, digest, spec)
select $1, e ->> 'name', e ->> 'version', e ->> 'digest', e - 'name' - 'version' - 'digest'
  from jsonb_array_elements($2::jsonb) as e
on conflict (worker_id, name) do nothing

-- name: publish_definitions
-- Daemon $1 publishes its definitions ($2) at startup and with each heartbeat. A
-- definition is written only when its row differs, so a fleet re-publishing unchanged
-- code writes nothing (not even a row lock: the identical rows never reach the insert);
-- and only by the newest live daemon (heard from within $3 seconds) that serves the
-- name, so two daemons with different options do not take turns: the one started last
-- wins, and when it dies the next newest takes the row back at its next beat.
with v as (
    select * from jsonb_to_recordset($2::jsonb) as v(
        name text, kind text, queue text, max_attempts integer, timeout float8,
        priority integer, retry jsonb, keyed boolean, key_limit integer,
        key_rate_limit integer, key_rate_period float8, version text, digest text,
        deadline float8, idempotency text)
), me as (
    select w.started_at from durable.workers w where w.id = $1
)
insert into durable.definitions as d
    (name, kind, queue, max_attempts, timeout, priority, retry, keyed, key_limit,
     key_rate_limit, key_rate_period, version, digest, published_by, published_at, deadline,
     idempotency)
select v.name, v.kind, v.queue, v.max_attempts, v.timeout, v.priority, v.retry, v.keyed,
       v.key_limit, v.key_rate_limit, v.key_rate_period, v.version, v.digest, $1, now(),
       v.deadline, coalesce(v.idempotency, 'forever')
  from v, me
 where not exists (
           select 1 from durable.definitions x
            where x.name = v.name
              and (x.kind, x.queue, x.max_attempts, x.timeout, x.priority, x.retry, x.keyed,
                   x.key_limit, x.key_rate_limit, x.key_rate_period, x.version, x.digest,
                   x.deadline, x.idempotency)
                  is not distinct from
                  (v.kind, v.queue, v.max_attempts, v.timeout, v.priority, v.retry, v.keyed,
                   v.key_limit, v.key_rate_limit, v.key_rate_period, v.version, v.digest,
                   v.deadline, coalesce(v.idempotency, 'forever')))
   and not exists (
           select 1 from durable.worker_definitions wd
             join durable.workers w on w.id = wd.worker_id
            where wd.name = v.name and w.id <> $1 and w.stopped_at is null
              and w.heartbeat_at > now() - make_interval(secs => $3)
              and (w.started_at, w.id) > (me.started_at, $1))
on conflict (name) do update
   set kind = excluded.kind, queue = excluded.queue, max_attempts = excluded.max_attempts,
       timeout = excluded.timeout, priority = excluded.priority, retry = excluded.retry,
       keyed = excluded.keyed, key_limit = excluded.key_limit,
       key_rate_limit = excluded.key_rate_limit, key_rate_period = excluded.key_rate_period,
       version = excluded.version, digest = excluded.digest,
       deadline = excluded.deadline, idempotency = excluded.idempotency,
       published_by = excluded.published_by, published_at = excluded.published_at
 -- The row as it is now, locked: the test above read this statement's snapshot, which
 -- may predate a newer daemon that registered and published the name since (the row
 -- then holds its definition). Taken over only from this daemon itself, or from a
 -- publisher seen to be older, stopped or silent, or gone and not heard from within $3.
 where d.published_by is not distinct from $1
    or exists (select 1 from durable.workers w, me
                where w.id = d.published_by
                  and (w.stopped_at is not null
                       or w.heartbeat_at <= now() - make_interval(secs => $3)
                       or (w.started_at, w.id) < (me.started_at, $1)))
    or (d.published_at <= now() - make_interval(secs => $3)
        and not exists (select 1 from durable.workers w where w.id = d.published_by))
returning name

-- name: resolve_definition
-- A name as the catalog resolves it (a start without the code).
select name, kind, queue, max_attempts, timeout, priority, retry::text, keyed, key_limit,
       key_rate_limit, key_rate_period, version, digest, published_by, published_at,
       deadline, idempotency
from durable.definitions where name = $1

-- name: list_definitions
select name, kind, queue, max_attempts, timeout, priority, retry::text, keyed, key_limit,
       key_rate_limit, key_rate_period, version, digest, published_by, published_at,
       deadline, idempotency
from durable.definitions order by name

-- name: served_definitions
-- What each live daemon (heard from within $1 seconds) serves.
select wd.name, w.id as worker_id, w.host, w.pid, wd.version, wd.digest, wd.spec::text,
       w.started_at
from durable.worker_definitions wd join durable.workers w on w.id = wd.worker_id
where w.stopped_at is null and w.heartbeat_at > now() - make_interval(secs => $1)
order by wd.name, w.started_at

-- name: in_flight_versions
-- Unfinished tasks per name and version (the partial indexes of queued, running and
-- waiting tasks, not the history).
select name, version,
       count(*) filter (where status = 'queued')::bigint as queued,
       count(*) filter (where status = 'running')::bigint as running,
       count(*) filter (where status = 'waiting')::bigint as waiting
from durable.tasks
where status in ('queued', 'running', 'waiting')
group by name, version

-- name: live_versions
-- The (name, version) pairs some live daemon ($1: heard from within this many seconds)
-- serves, for `durable ls` to say which queued tasks wait for a version nobody has.
select distinct wd.name, wd.version
from durable.worker_definitions wd join durable.workers w on w.id = wd.worker_id
where w.stopped_at is null and w.heartbeat_at > now() - make_interval(secs => $1)

-- name: verify_runs
-- The workflow runs `durable verify` replays: names in $1, status in $2 (null: any),
-- created since $3, the newest $4; each on its current branch.
select id, name, args::text, kwargs::text, status, branch, attempt
from durable.tasks
where kind = 'workflow' and name = any($1::text[])
  and ($2::text[] is null or status = any($2::text[]))
  and ($3::timestamptz is null or created_at >= $3)
order by id desc
limit $4

-- name: verify_events
-- The event logs of runs $1 on their branches $2, as load_events reads one.
select e.task_id, e.seq, e.kind, e.name, e.digest, e.status, e.result::text, e.error::text,
       e.child_id, e.wake_at, c.status as child_status, c.result::text as child_result,
       c.error::text as child_error
from unnest($1::bigint[], $2::integer[]) as r(task_id, branch)
join durable.events e on e.task_id = r.task_id and e.branch = r.branch
left join durable.tasks c on c.id = e.child_id
order by e.task_id, e.seq

-- The test kit (durable.testing) --------------------------------------------------------

-- name: clock_shift_statements
-- The test's moved clock (env.advance): for each table of the durable schema, one UPDATE
-- that moves every timestamptz value still ahead of now() earlier by $1 (an interval).
-- The columns come from the catalog, so a deadline added later is moved with the rest.
-- Left out: leases (a live worker keeps extending its own; a dead one's are expired by
-- the test kit when it resumes) and the schedules, whose times are on the scheduler's
-- clock, which the test kit moves instead. Identifiers are quoted by format('%I').
select format('update durable.%I set %s where %s', c.relname,
              string_agg(format('%1$I = case when %1$I > now() then %1$I - $1::interval'
                                ' else %1$I end', a.attname), ', ' order by a.attnum),
              string_agg(format('%I > now()', a.attname), ' or ' order by a.attnum))
       as statement
  from pg_class c
  join pg_attribute a on a.attrelid = c.oid
  join pg_type t on t.oid = a.atttypid
 where c.relnamespace = 'durable'::regnamespace and c.relkind in ('r', 'p')
   and not c.relispartition and c.relname <> 'schedules'
   and a.attnum > 0 and not a.attisdropped and a.attgenerated = ''
   and coalesce(nullif(t.typbasetype, 0::oid), t.oid) = 'timestamptz'::regtype
   and not (c.relname = 'tasks' and a.attname = 'lease_until')
 group by c.relname
 order by c.relname

-- name: clock_next_statements
-- For each table that clock_shift_statements moves, one query for the earliest of its
-- times still ahead of now(): env.advance stops there to run what comes due, in order.
select format('select min(least(%s)) from durable.%I',
              string_agg(format('case when %1$I > now() then %1$I end', a.attname), ', '
                         order by a.attnum),
              c.relname) as statement
  from pg_class c
  join pg_attribute a on a.attrelid = c.oid
  join pg_type t on t.oid = a.atttypid
 where c.relnamespace = 'durable'::regnamespace and c.relkind in ('r', 'p')
   and not c.relispartition and c.relname <> 'schedules'
   and a.attnum > 0 and not a.attisdropped and a.attgenerated = ''
   and coalesce(nullif(t.typbasetype, 0::oid), t.oid) = 'timestamptz'::regtype
   and not (c.relname = 'tasks' and a.attname = 'lease_until')
 group by c.relname
 order by c.relname

-- name: times_only
-- The transaction changes times only: tasks_after_update acts on statuses, which it leaves
-- as they were, so the pass is skipped as for a claim's update.
select set_config('durable.claiming', 'on', true)

-- name: idle_state
-- What keeps a test's worker from being idle (env.run_until_idle): tasks running, queued
-- and due, or waiting on a timer that is due; the due ones the worker cannot run (not of
-- queues $1 and names $2); the running ones held by a worker other than $3.
select count(*) filter (where status = 'running')::int as running,
       count(*) filter (where status = 'queued' and run_at <= now())::int as ready,
       count(*) filter (where status = 'waiting' and wake_at <= now())::int as timers,
       coalesce(array_agg(id order by id) filter (
           where status = 'queued' and run_at <= now()
             and not (queue = any($1::text[]) and name = any($2::text[]))), '{}') as unserved,
       coalesce(array_agg(id order by id) filter (
           where status = 'running' and worker_id is distinct from $3), '{}') as elsewhere
  from durable.tasks
 where status in ('queued', 'running', 'waiting')

-- name: expire_leases
-- A killed test worker's leases, run out at once (env.resume): the reaper then requeues
-- its tasks as it would once DURABLE_LEASE had passed.
update durable.tasks set lease_until = now() - interval '1 millisecond'
 where status = 'running' and worker_id = $1
returning id

-- name: insert_task_labelled
-- insert_task_keyed with tags ($16, a text[]) and attributes ($17, a JSON object): the
-- statement of a start that gives either; $15, the idempotency key, may be null; $18 the
-- definition's version, $19 the seconds to its deadline.
insert into durable.tasks as t
    (queue, name, kind, args, kwargs, priority, run_at, max_attempts, timeout,
     concurrency_key, key_limit, key_rate_limit, key_rate_period, trace_context,
     idempotency_key, tags, attributes, version, deadline)
values ($1::text, $2::text, $3::text, $4::jsonb, $5::jsonb, $6, coalesce($7, now()),
        $8::integer, $9::float8, $10, $11::integer, $12::integer, $13::float8, $14::jsonb,
        $15, $16::text[], $17::jsonb, $18::text, now() + make_interval(secs => $19::float8))
on conflict (idempotency_key) where idempotency_key is not null
    do update set idempotency_key = excluded.idempotency_key
returning t.id, (t.xmax = 0) as inserted

-- name: load_tail
-- A warm resume: the events of branch $2 from position $3 on, each with the claim token
-- of the attempt that last suspended the task, which tells whether anyone ran the task
-- since this daemon suspended it (one row with a null seq when there are no such events).
select t.suspend_token, e.seq, e.kind, e.name, e.digest, e.status, e.result::text,
       e.error::text, e.child_id, e.wake_at, c.status as child_status,
       c.result::text as child_result, c.error::text as child_error
from durable.tasks t
left join durable.events e on e.task_id = t.id and e.branch = $2 and e.seq >= $3
left join durable.tasks c on c.id = e.child_id
where t.id = $1
order by e.seq

-- name: load_parked
-- load_tail, and the events at the positions $4 (before $3): a gather of handles spawned
-- earlier reads their children's events again, and only theirs. (Read from the first
-- of them on, a loop awaiting n handles in turn read the whole fan-out at every resume.)
-- One probe by the whole key per position (see record_children: `seq = any($4)` was
-- planned as a read of the whole log).
select t.suspend_token, e.seq, e.kind, e.name, e.digest, e.status, e.result::text,
       e.error::text, e.child_id, e.wake_at, c.status as child_status,
       c.result::text as child_result, c.error::text as child_error
from durable.tasks t
left join lateral (
    select x.* from durable.events x where x.task_id = t.id and x.branch = $2 and x.seq >= $3
    union all
    select x.* from unnest($4::int[]) as s(seq),
           lateral (select * from durable.events p
                     where p.task_id = t.id and p.branch = $2 and p.seq = s.seq
                    offset 0) x
) e on true
left join durable.tasks c on c.id = e.child_id
where t.id = $1
order by e.seq

-- name: continue_as_new
-- ctx.continue_as_new: end run $1 (claim token $2), start the next with args $3, kwargs $4.
select durable.continue_as_new($1, $2, $3::jsonb, $4::jsonb)

-- name: chain
-- The run a task continues and the run that continued it (ctx.continue_as_new).
select continued_from, continued_as from durable.tasks where id = $1

-- name: report_progress
-- A running task's latest progress, under its claim ($2): a stale attempt writes nothing.
-- Clients waiting on handle.progress() hear of it on `durable_progress` (payload: the id).
with written as (
    insert into durable.progress as p (task_id, value, message, updated_at)
    select $1, $3::jsonb, $4, now()
     where exists (select 1 from durable.tasks t where t.id = $1 and t.claim_token = $2)
    on conflict (task_id) do update
       set value = excluded.value, message = excluded.message, updated_at = excluded.updated_at
    returning p.task_id
)
select pg_notify('durable_progress', w.task_id::text) from written w

-- name: progress_state
-- A task's status and latest progress (null when it never reported any).
select t.status, p.value::text as value, p.message, p.updated_at
from durable.tasks t left join durable.progress p on p.task_id = t.id
where t.id = $1

-- name: progress_of
select task_id, value::text as value, message, updated_at from durable.progress
where task_id = any($1::bigint[])

-- name: fail_deadline
-- The task's deadline passed: it fails (cancelled if a cancel came first, as `fail`) and
-- every unfinished descendant is cancelled. Its tree is locked first, children before
-- parents (durable.lock_trees): taking its waiting child's row in the cascade and then a
-- grandchild's deadlocked with the grandchild finishing, which locks its own row and then
-- its waiting parent's.
with locked as materialized (
    select durable.lock_trees(array[$1::bigint])
), failed as (
    update durable.tasks t
       set status = case when t.cancel_requested then 'cancelled' else 'failed' end,
           error = $3::jsonb, finished_at = now(),
           claim_token = null, lease_until = null
      from locked
     where t.id = $1 and t.claim_token = $2 and t.status = 'running'
    returning t.id
)
select (select id from failed),
       (select count(*) from durable.cancel_descendants(array(select id from failed)))

-- name: insert_task_debounced
-- start(..., debounce=$17, debounce_key=$18, max_delay=$19): the queued task of the key,
-- if any, takes these arguments and options (the last start wins; it keeps its id, name,
-- key, created_at, tags and attributes) and runs $17 seconds from now, but never later
-- than $19 seconds after that task's first start (any start's $19: a later one may bring
-- that time closer, never push it back); else a new task, due in $17 seconds. As
-- durable.start's debounced insert.
insert into durable.tasks as t
    (queue, name, kind, args, kwargs, priority, run_at, max_attempts, timeout,
     concurrency_key, key_limit, key_rate_limit, key_rate_period, trace_context,
     version, deadline, debounce_key, debounce_until)
values ($1::text, $2::text, $3::text, $4::jsonb, $5::jsonb, $6,
        coalesce($7::timestamptz,  -- null: start refuses delay and run_at with debounce
                 least(now() + make_interval(secs => $17::float8),
                       now() + make_interval(secs => $19::float8))),
        $8::integer, $9::float8, $10, $11::integer, $12::integer, $13::float8, $14::jsonb,
        $15::text, now() + make_interval(secs => $16::float8), $18,
        now() + make_interval(secs => $19::float8))
on conflict (debounce_key) where debounce_key is not null and status = 'queued'
    do update set queue = excluded.queue, kind = excluded.kind, args = excluded.args,
                  kwargs = excluded.kwargs, priority = excluded.priority,
                  max_attempts = excluded.max_attempts, timeout = excluded.timeout,
                  concurrency_key = excluded.concurrency_key, key_limit = excluded.key_limit,
                  key_rate_limit = excluded.key_rate_limit,
                  key_rate_period = excluded.key_rate_period,
                  trace_context = excluded.trace_context, version = excluded.version,
                  deadline = excluded.deadline,
                  -- Every expression reads the row as it was: the bound is computed for both.
                  debounce_until = least(t.debounce_until,
                                         t.created_at + make_interval(secs => $19::float8)),
                  run_at = least(excluded.run_at, t.debounce_until,
                                 t.created_at + make_interval(secs => $19::float8))
        where t.name = excluded.name  -- a key pending for another task: no row, refused
returning t.id, (t.xmax = 0) as inserted
