-- `durable soak`: the tables its workload writes, the triggers that audit every write the
-- engine makes, and the checks run at the end. Sections start with `-- name: x`; they live
-- in the soak's own scratch database, never in a user's.

-- name: setup
create schema soak;

-- Each run of a step's or task's body, recorded as it starts: a step records whether its
-- checkpoint already existed then (a step must never start again once it has one).
create table soak.effects (
    run_id             uuid primary key,
    kind               text not null,
    key                text not null,
    task_id            bigint,
    seq                integer,
    attempt            integer,
    checkpoint_existed boolean,
    pid                integer not null,
    at                 timestamptz not null default clock_timestamp()
);

-- The business rows of ctx.transaction: committed with their checkpoint, so exactly once.
create table soak.business (
    id       bigint generated always as identity primary key,
    task_id  bigint not null,
    seq      integer not null,
    attempt  integer not null,
    pid      integer not null,
    at       timestamptz not null default clock_timestamp()
);

-- What the producers started (idempotency key = key) and what they expect of it: the
-- event they sent it, and whether they cancelled it.
create table soak.started (
    key          text primary key,
    kind         text not null,
    event        text,
    cancelled    boolean not null default false,
    -- null: the task completes; otherwise the name of the exception its attempts raise,
    -- which some attempt's recorded error must name (an outcome that could not be
    -- written shows up as a lease that expired instead).
    raises       text,
    at           timestamptz not null default clock_timestamp()
);

-- The tasks the soak asked to cancel (by the producers or a fault), and the ids each
-- cancel returned (acknowledged as cancelled).
create table soak.cancel_asked (
    task_id      bigint not null
);
create table soak.cancels (
    task_id      bigint not null,
    acked_at     timestamptz not null
);

-- Every status change of every task, written by a row trigger: the completion log. The
-- holder is the daemon whose claim the change ended; a result names the process (and for
-- a workflow the attempt) that produced it.
create table soak.transitions (
    id             bigint generated always as identity primary key,
    task_id        bigint not null,
    old_status     text not null,
    new_status     text not null,
    attempt        integer not null,
    new_attempt    integer not null,
    worker_id      uuid,
    holder_pid     integer,
    result_pid     integer,
    result_attempt integer,
    error_type     text,
    error_message  text,
    at             timestamptz not null default clock_timestamp()
);
create index on soak.transitions (task_id);

-- Every write to the event log, with the state of its task at that moment.
create table soak.event_writes (
    id            bigint generated always as identity primary key,
    op            text not null,
    task_id       bigint not null,
    branch        integer not null,
    seq           integer not null,
    kind          text not null,
    status        text not null,
    event_attempt integer not null,
    task_attempt  integer,
    task_status   text,
    at            timestamptz not null default clock_timestamp()
);

create function soak.on_transition() returns trigger
language plpgsql as $$
begin
    insert into soak.transitions
        (task_id, old_status, new_status, attempt, new_attempt, worker_id, holder_pid,
         result_pid, result_attempt, error_type, error_message)
    values
        (new.id, old.status, new.status, old.attempt, new.attempt, old.worker_id,
         (select w.pid from durable.workers w where w.id = old.worker_id),
         case when new.status = 'completed' and jsonb_typeof(new.result) = 'object'
              then (new.result ->> 'pid')::integer end,
         case when new.status = 'completed' and jsonb_typeof(new.result) = 'object'
              then (new.result ->> 'attempt')::integer end,
         case when new.status in ('queued', 'failed') then new.error ->> 'type' end,
         case when new.status in ('queued', 'failed')
              then left(new.error ->> 'message', 300) end);
    return null;
end;
$$;

create trigger soak_transitions after update on durable.tasks
    for each row when (old.status is distinct from new.status)
    execute function soak.on_transition();

-- The audit of claims: every change of a task's claim token (a claim draws one; every
-- way out of running clears it) and every cancel request, with the task's queue and key
-- at that moment. Intervals of live claims come from it: a claim lives from the row
-- that set its token to the first row that changed it. A trigger's clock_timestamp()
-- runs before its commit, but a claim can only follow a release (or count it as gone)
-- after the release committed, so a correct engine never shows two intervals of one
-- task, or more than a limit's worth of one queue or key, overlapping. (A cancel
-- request leaves the token as it is: its row is neither a claim nor a release.)
create table soak.claims (
    id              bigint generated always as identity primary key,
    task_id         bigint not null,
    old_token       bigint,
    new_token       bigint,
    old_status      text not null,
    new_status      text not null,
    queue           text not null,
    concurrency_key text,
    key_limit       integer,
    cancel_set      boolean not null,
    at              timestamptz not null default clock_timestamp()
);
create index on soak.claims (task_id);

create function soak.on_claim_change() returns trigger
language plpgsql as $$
begin
    insert into soak.claims
        (task_id, old_token, new_token, old_status, new_status, queue, concurrency_key,
         key_limit, cancel_set)
    values
        (new.id, old.claim_token, new.claim_token, old.status, new.status, new.queue,
         new.concurrency_key, new.key_limit,
         new.cancel_requested and not old.cancel_requested);
    return null;
end;
$$;

create trigger soak_claims after update on durable.tasks
    for each row when (old.claim_token is distinct from new.claim_token
                       or old.cancel_requested is distinct from new.cancel_requested)
    execute function soak.on_claim_change();

create function soak.on_event_write() returns trigger
language plpgsql as $$
begin
    insert into soak.event_writes
        (op, task_id, branch, seq, kind, status, event_attempt, task_attempt, task_status)
    select tg_op, new.task_id, new.branch, new.seq, new.kind, new.status, new.attempt,
           t.attempt, t.status
      from durable.tasks t where t.id = new.task_id;
    return null;
end;
$$;

create trigger soak_event_writes after insert or update on durable.events
    for each row execute function soak.on_event_write();

-- The daemons' role logs in with a password (the embedded server takes no other way in);
-- a fresh one each soak, never written anywhere but into the daemons' environment.
create function soak.set_password(role text, password text) returns void
language plpgsql as $$
begin
    execute format('alter role %I password %L', role, password);
end;
$$;

-- Grant the daemons' own role (a non-superuser, so that its logins can be refused) what
-- the workload and the triggers above write.
create function soak.grant_to(role text) returns void
language plpgsql as $$
begin
    execute format('grant usage on schema soak to %I', role);
    execute format('grant select, insert on all tables in schema soak to %I', role);
    execute format('grant usage on all sequences in schema soak to %I', role);
end;
$$;

-- name: create_role
-- The daemons' role; the server may be a kept one (--home) that has it already.
do $$
begin
    create role durable_soak login nosuperuser nocreatedb nocreaterole;
exception when duplicate_object then
    alter role durable_soak login;
end
$$

-- name: grant
select soak.grant_to($1)

-- name: set_password
select soak.set_password($1, $2)

-- name: refuse_logins
-- A reconnect refused for good, as far as the daemon can tell: SQLSTATE 28000 (the
-- role may not log in) or 42501 (CONNECT revoked). Existing sessions stay.
alter role durable_soak nologin

-- name: admit_logins
alter role durable_soak login

-- name: revoke_connect
revoke connect on database durable_soak from public, durable_soak

-- name: grant_connect
grant connect on database durable_soak to public

-- name: bad_schedules
-- Rows the tables take but no CLI would write: an unknown time zone, a minute past 59, a
-- cron that does not parse. All due now. A daemon must skip them and serve the rest.
insert into durable.schedules (name, task_name, cron, timezone, queue, next_run_at)
values ('soak-bad-tz', 'soak_never', '* * * * *', 'Mars/Olympus_Mons', 'soak', now()),
       ('soak-bad-minute', 'soak_never', '61 * * * *', 'UTC', 'soak', now()),
       ('soak-bad-cron', 'soak_never', 'every full moon', 'UTC', 'soak', now())
on conflict do nothing

-- name: clear_bad_schedules
delete from durable.schedules where name like 'soak-bad-%'

-- name: bad_queue
-- A rate period of 100 million days, as a row from before the table's check (or written
-- with the check dropped by hand) can hold: now() minus it is out of the timestamp range.
do $$
begin
    alter table durable.queues drop constraint if exists queues_period_check;
    insert into durable.queues (name, rate_limit, rate_period) values ('soak-bad-rate', 5, 8.64e12)
    on conflict (name) do update set rate_limit = 5, rate_period = 8.64e12;
end
$$

-- name: clear_bad_queue
do $$
begin
    delete from durable.queues where name = 'soak-bad-rate';
    alter table durable.queues
        add constraint queues_period_check check (rate_period <= 31536000);
end
$$

-- name: set_concurrency
insert into durable.queues (name, concurrency) values ($1, $2)
on conflict (name) do update set concurrency = excluded.concurrency

-- name: record_cancel_asked
insert into soak.cancel_asked (task_id) select * from unnest($1::bigint[])

-- name: record_cancels
insert into soak.cancels (task_id, acked_at)
select * from unnest($1::bigint[], $2::timestamptz[])

-- name: record_effect
-- A body starts: $6 is the workflow's event-log position, checked for a checkpoint now.
insert into soak.effects (run_id, kind, key, task_id, seq, attempt, checkpoint_existed, pid)
values ($1::uuid, $2, $3, $4, $5, $6,
        case when $4::bigint is null then null
             else exists (select 1 from durable.events e
                          where e.task_id = $4 and e.branch = 0 and e.seq = $5) end,
        $7)
on conflict (run_id) do nothing

-- name: runs_of
-- How many runs of this body have started, this one included.
select count(*)::bigint from soak.effects where kind = $1 and key = $2

-- name: business
insert into soak.business (task_id, seq, attempt, pid) values ($1, $2, $3, $4)

-- name: record_started
insert into soak.started (key, kind, event, cancelled, raises)
select * from unnest($1::text[], $2::text[], $3::text[], $4::boolean[], $5::text[])
on conflict (key) do nothing

-- name: listener_backends
-- The LISTEN connections of the daemons (the faults terminate them).
select pid from pg_stat_activity
where application_name = 'durable-listener' and datname = current_database()

-- name: terminate
select pg_terminate_backend(p) from unnest($1::int[]) as p

-- name: held_by
-- The tasks the daemon process $1 holds right now.
select coalesce(array_agg(t.id order by t.id), '{}') from durable.tasks t
join durable.workers w on w.id = t.worker_id
where t.status = 'running' and w.pid = $1 and w.stopped_at is null

-- name: held_roots
-- The tasks without a parent that the daemon process $1 holds right now.
select coalesce(array_agg(t.id order by t.id), '{}') from durable.tasks t
join durable.workers w on w.id = t.worker_id
where t.status = 'running' and t.parent_id is null and w.pid = $1 and w.stopped_at is null

-- name: released_at
-- When each of the tasks $1 (held by a daemon a fault hit at $2) left that claim: the
-- first status change out of running after $2.
select h.id, (select min(x.at) from soak.transitions x
              where x.task_id = h.id and x.old_status = 'running' and x.at > $2) as at
from unnest($1::bigint[]) as h(id)

-- name: unfinished
select count(*)::bigint from durable.tasks where status not in ('completed', 'failed', 'cancelled')

-- name: progress
select count(*) filter (where status = 'completed')::bigint as completed,
       count(*) filter (where status = 'failed')::bigint as failed,
       count(*) filter (where status not in ('completed', 'failed', 'cancelled'))::bigint
           as unfinished
from durable.tasks

-- name: last_completion
select max(at) from soak.transitions where new_status = 'completed'

-- name: completions_after
-- When the first task completed after $1 (how long the fleet took to serve again).
select min(at) from soak.transitions where new_status = 'completed' and at > $1

-- name: stats
select
    (select count(*) from durable.tasks where kind = 'task')::bigint as tasks,
    (select count(*) from durable.tasks where kind = 'workflow')::bigint as workflows,
    (select count(*) from durable.tasks where parent_id is not null)::bigint as children,
    (select count(*) from durable.tasks
      where parent_id is not null and attempt > 1)::bigint as children_restarted,
    (select count(*) from durable.tasks where status = 'completed')::bigint as completed,
    (select count(*) from durable.tasks where status = 'failed')::bigint as failed,
    (select count(*) from durable.tasks where status = 'cancelled')::bigint as cancelled,
    (select count(*) from durable.events)::bigint as events,
    (select count(*) from durable.events where kind = 'step')::bigint as steps,
    (select count(*) from durable.events where kind = 'transaction')::bigint as transactions,
    (select count(*) from durable.events where kind = 'sleep')::bigint as sleeps,
    (select count(*) from durable.events where kind = 'event')::bigint as event_waits,
    (select count(*) from soak.effects)::bigint as body_runs,
    (select count(*) from soak.effects where kind = 'step')::bigint as step_runs,
    (select count(*) from soak.business)::bigint as business_rows,
    (select count(*) from soak.transitions
      where old_status = 'running' and new_status in ('queued', 'failed')
        and error_type = 'durable.LeaseExpired')::bigint as leases_expired,
    (select count(*) from soak.transitions
      where old_status = 'running' and new_status = 'queued'
        and error_type is distinct from 'durable.LeaseExpired')::bigint as retried_or_released,
    (select count(*) from durable.tasks where attempt > 1)::bigint as tasks_with_retries,
    (select max(attempt) from durable.tasks)::int as max_attempt,
    (select count(*) from durable.signals)::bigint as events_sent,
    (select count(*) from soak.claims
      where new_token is not null and new_token is distinct from old_token)::bigint as claims,
    (select count(*) from soak.claims where cancel_set)::bigint as cancel_requests

-- name: check_lost
-- Started by a producer, yet no task carries its key.
select s.key, s.kind from soak.started s
left join durable.tasks t on t.idempotency_key = s.key
where t.id is null
order by s.key

-- name: check_unfinished
select id, name, status, attempt, waiting_on::text, waiting_event, wake_at
from durable.tasks where status not in ('completed', 'failed', 'cancelled')
order by id

-- name: check_outcomes
-- Every finished task ended as its workload intends: soak_doomed fails (NonRetryable);
-- a task started to raise an exception fails, and some attempt recorded an error naming
-- that exception (a CancelledError of its own may also end it cancelled); everything
-- else completes. In the tree of a task the soak cancelled, ending cancelled is right
-- too (or the intended outcome, when the task finished before the cancel reached it).
with roots as (
    select t.id, s.cancelled or t.id in (select task_id from soak.cancel_asked) as cancelled,
           s.raises
    from soak.started s join durable.tasks t on t.idempotency_key = s.key
)
select t.id, t.name, t.status, t.attempt, t.error ->> 'type' as error_type,
       left(t.error ->> 'message', 200) as message, r.raises
from durable.tasks t
left join roots r on r.id = t.id
left join roots tree on tree.id = t.root_id
where t.status in ('completed', 'failed', 'cancelled')
  and not (
      (t.status = 'cancelled' and coalesce(r.cancelled, tree.cancelled, false))
      or case
          when t.name = 'soak_doomed'
              then t.status = 'failed' and t.error ->> 'type' = 'durable.errors.NonRetryable'
          when r.raises is not null
              then (t.status = 'cancelled' and r.raises = 'CancelledError')
                   or (t.status = 'failed' and exists (
                       select 1 from soak.transitions x
                       where x.task_id = t.id and x.old_status = 'running'
                         and x.new_status in ('queued', 'failed')
                         and (strpos(x.error_type, r.raises) > 0
                              or strpos(x.error_message, r.raises) > 0)))
          else t.status = 'completed' end)
order by t.id

-- name: check_acked_cancels
-- A cancel acknowledged (client.cancel returned the id) whose request reached the task
-- unfinished (the audit saw cancel_requested set while it was queued, running or
-- waiting) must end the task cancelled: a cancel that commits before the outcome wins.
select t.id, t.name, t.status, t.attempt, t.error ->> 'type' as error_type,
       min(c.acked_at) as acked_at, t.finished_at
from soak.cancels c
join durable.tasks t on t.id = c.task_id
where t.status <> 'cancelled'
  and exists (select 1 from soak.claims a
              where a.task_id = t.id and a.cancel_set
                and a.old_status in ('queued', 'running', 'waiting'))
group by t.id
order by t.id

-- name: check_double_claims
-- Two live claims on one task at once: a claim that replaced a live token (the row went
-- from one token straight to another), or a claim taken while an earlier one was still
-- live by the audit's intervals.
with iv as (
    select s.task_id, s.new_token as token, s.at as claimed_at,
           (select min(e.at) from soak.claims e
             where e.task_id = s.task_id and e.old_token = s.new_token
               and e.new_token is distinct from e.old_token) as released_at
    from soak.claims s
    where s.new_token is not null and s.new_token is distinct from s.old_token
)
select task_id, old_token as first_token, new_token as second_token, at,
       'claimed over a live token' as how
from soak.claims where old_token is not null and new_token is not null
  and old_token <> new_token
union all
select a.task_id, a.token, b.token, b.claimed_at, 'claimed while another claim lived'
from iv a join iv b on b.task_id = a.task_id and b.token <> a.token
where (b.claimed_at, b.token) > (a.claimed_at, a.token)
  and b.claimed_at < coalesce(a.released_at, 'infinity')
  and not exists (select 1 from soak.claims r
                  where r.task_id = a.task_id and r.old_token = a.token
                    and r.new_token = b.token)
order by 1, 4

-- name: check_limits
-- The most claims live at once per limited queue (durable.queues concurrency) and per
-- concurrency key (key_limit, across every queue), from the audit's intervals, where it
-- exceeded the limit: a running count over claim (+1) and release (-1) instants, releases
-- first at a tie.
with iv as (
    select s.task_id, s.queue, s.concurrency_key, s.key_limit, s.at as claimed_at,
           (select min(e.at) from soak.claims e
             where e.task_id = s.task_id and e.old_token = s.new_token
               and e.new_token is distinct from e.old_token) as released_at
    from soak.claims s
    where s.new_token is not null and s.new_token is distinct from s.old_token
), scoped as (
    select 'queue ' || iv.queue as scope, q.concurrency as lim, iv.claimed_at, iv.released_at
    from iv join durable.queues q on q.name = iv.queue
    where q.concurrency is not null
    union all
    select 'key ' || iv.concurrency_key, iv.key_limit, iv.claimed_at, iv.released_at
    from iv where iv.concurrency_key is not null and iv.key_limit is not null
), steps as (
    select scope, lim, claimed_at as at, 1 as d from scoped
    union all
    select scope, lim, released_at, -1 from scoped where released_at is not null
), running as (
    select scope, lim, at,
           sum(d) over (partition by scope order by at, d rows unbounded preceding) as live
    from steps
)
select scope, min(lim)::int as lim, max(live)::int as most_at_once,
       count(*) filter (where live > lim)::int as instants_over, min(at) filter (where live > lim) as first_at
from running
group by scope
having max(live) > min(lim)
order by scope

-- name: check_left_final
-- A task that left a final state (no restart runs in the soak): a cancelled task taken
-- up again, say.
select task_id, old_status, new_status, attempt, at from soak.transitions
where old_status in ('completed', 'failed', 'cancelled')
order by id

-- name: check_suspend_spin
-- Tasks that suspended far more often than the workload's waits explain (at most five
-- waits, each suspending again only after a fault): a deadline the database finds
-- already past at once, suspend after suspend.
select task_id, count(*)::int as suspends from soak.transitions
where old_status = 'running' and new_status in ('waiting', 'queued') and error_type is null
group by task_id having count(*) > 30
order by task_id

-- name: check_completed_twice
select task_id, count(*)::int as completions from soak.transitions
where new_status = 'completed'
group by task_id having count(*) > 1
order by task_id

-- name: check_completion_log
-- Every completed task has exactly one entry in the completion log.
select t.id from durable.tasks t
where t.status = 'completed'
  and (select count(*) from soak.transitions x
        where x.task_id = t.id and x.new_status = 'completed') <> 1
order by t.id

-- name: check_step_reruns
-- A step body that started although its checkpoint had already committed, in the same or
-- a later attempt than the one that committed it (a replay that ran it again).
select e.task_id, e.seq, e.attempt as run_attempt, ev.attempt as checkpoint_attempt, e.pid
from soak.effects e
join durable.events ev on ev.task_id = e.task_id and ev.branch = 0 and ev.seq = e.seq
where e.kind = 'step' and e.checkpoint_existed and e.attempt >= ev.attempt
order by e.task_id, e.seq

-- name: stale_step_runs
-- Step bodies that a frozen or cut-off attempt started after its successor had already
-- committed that step (at least once: the engine fenced their checkpoints).
select count(*)::bigint from soak.effects e
join durable.events ev on ev.task_id = e.task_id and ev.branch = 0 and ev.seq = e.seq
where e.kind = 'step' and e.checkpoint_existed and e.attempt < ev.attempt

-- name: check_step_results
-- A step's recorded result must come from one of its runs.
select ev.task_id, ev.seq from durable.events ev
where ev.kind = 'step' and ev.status = 'completed'
  and ev.name in ('first', 'last')  -- the steps whose bodies record their runs
  and not exists (select 1 from soak.effects e
                  where e.run_id::text = ev.result ->> 'run' and e.task_id = ev.task_id
                    and e.seq = ev.seq)
order by ev.task_id, ev.seq

-- name: check_business
-- Each committed ctx.transaction has exactly one business row, written by the attempt
-- that committed it; and no business row exists without its checkpoint.
select ev.task_id, ev.seq, 'rows' as problem,
       (select count(*) from soak.business b
         where b.task_id = ev.task_id and b.seq = ev.seq)::int as n
from durable.events ev
where ev.kind = 'transaction' and ev.status = 'completed'
  and (select count(*) from soak.business b
        where b.task_id = ev.task_id and b.seq = ev.seq and b.attempt = ev.attempt) <> 1
union all
select b.task_id, b.seq, 'orphan', 1 from soak.business b
where not exists (select 1 from durable.events ev
                  where ev.task_id = b.task_id and ev.branch = 0 and ev.seq = b.seq
                    and ev.kind = 'transaction' and ev.status = 'completed')
   or exists (select 1 from soak.business c
               where c.task_id = b.task_id and c.seq = b.seq and c.id <> b.id)
order by 1, 2

-- name: check_zombie_events
-- An event-log write accepted while its attempt did not hold the task.
select id, op, task_id, seq, kind, event_attempt, task_attempt, task_status
from soak.event_writes
where task_status is distinct from 'running'
   or (op = 'INSERT' and event_attempt is distinct from task_attempt)
order by id

-- name: check_zombie_completions
-- A completion accepted from a process, or a workflow attempt, that did not hold the
-- claim it ended; or a completion of a task that was not running.
select task_id, old_status, attempt, holder_pid, result_pid, result_attempt
from soak.transitions
where new_status = 'completed'
  and (old_status <> 'running'
       or result_pid is distinct from holder_pid
       or (result_attempt is not null and result_attempt <> attempt))
order by id

-- name: check_events_delivered
-- A workflow sent its event must have received exactly that payload; one never sent an
-- event must have timed out.
select t.id, s.key, s.event as sent, t.result ->> 'event' as got
from soak.started s
join durable.tasks t on t.idempotency_key = s.key
where s.kind = 'workflow' and t.status = 'completed' and not s.cancelled
  and (t.result ->> 'event') is distinct from coalesce(s.event, 'timeout')
order by t.id

-- name: registered
-- The daemon process $1 has registered (it got past its startup).
select exists (select 1 from durable.workers where pid = $1 and stopped_at is null)
