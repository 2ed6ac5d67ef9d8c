-- One claim per task, key limits that hold across queues, cancels that win.
--
-- durable.claim: a keyed claim locked the rows it chose by id without testing their
-- status again, and PostgreSQL re-checks a locked row against the conditions of its own
-- scan only: a task claimed and committed by another daemon after the claim's snapshot
-- was claimed a second time, and a task cancelled meanwhile went back to running. Keys'
-- limits count running tasks in every queue, but claimers serialised per queue; keyed
-- claims now share one lock, and the plain branch leaves keyed tasks to them.
--
-- Cancels: every statement that writes an attempt's outcome reads cancel_requested (a
-- completion and a failure now do too), durable.cancel says which tasks it reached and
-- which had already finished, and one function cascades a cancel, run by the update
-- trigger for every task that ends cancelled, whatever ended it.

create function durable.cancel_descendants(parents bigint[])
returns table (id bigint, status text)
language plpgsql as $$
#variable_conflict use_column
declare
    outer_cascade text := current_setting('durable.cascading', true);
    r record;
begin
    -- The updates below end tasks cancelled: their own trigger pass must not cascade
    -- again, this statement already reaches the whole tree.
    perform set_config('durable.cascading', 'on', true);
    for r in
        with recursive tree as (
            select c.id from durable.tasks c where c.parent_id = any(parents)
            union
            select c.id from durable.tasks c join tree on c.parent_id = tree.id
        )
        update durable.tasks t
           set cancel_requested = true,
               status = case when t.status = 'running' then 'running' else 'cancelled' end,
               finished_at = case when t.status = 'running' then null else now() end,
               wake_at = null, waiting_on = null, waiting_event = null
          from tree
         where t.id = tree.id and t.status in ('queued', 'running', 'waiting')
        returning t.id, t.status::text as status
    loop
        if r.status = 'running' then
            perform pg_notify('durable_control', 'cancel:' || r.id);
        end if;
        id := r.id;
        status := r.status;
        return next;
    end loop;
    perform set_config('durable.cascading', coalesce(outer_cascade, ''), true);
end;
$$;

create function durable.cancel(ids bigint[])
returns table (id bigint, status text, already_finished boolean)
language plpgsql as $$
#variable_conflict use_column
declare
    outer_cascade text := current_setting('durable.cascading', true);
    asked bigint[] := '{}';
    r record;
begin
    -- Lock first, read in a later statement: its snapshot sees an outcome that committed
    -- before the lock was granted, and an outcome written after this commits sees the
    -- request. Id order: two cancels of overlapping sets cannot deadlock.
    perform 1 from durable.tasks t where t.id = any(ids) order by t.id for update;
    perform set_config('durable.cascading', 'on', true);  -- the cascade is below
    for r in
        update durable.tasks t
           set cancel_requested = true,
               status = case when t.status = 'running' then 'running' else 'cancelled' end,
               finished_at = case when t.status = 'running' then null else now() end,
               wake_at = null, waiting_on = null, waiting_event = null
         where t.id = any(ids) and t.status in ('queued', 'running', 'waiting')
        returning t.id, t.status::text as status
    loop
        if r.status = 'running' then
            perform pg_notify('durable_control', 'cancel:' || r.id);
        end if;
        asked := asked || r.id;
        id := r.id;
        status := r.status;
        already_finished := false;
        return next;
    end loop;
    perform set_config('durable.cascading', coalesce(outer_cascade, ''), true);
    return query
        select t.id, t.status::text, true from durable.tasks t
         where t.id = any(ids) and t.status in ('completed', 'failed', 'cancelled')
           and not t.id = any(asked);
    if asked <> '{}' then
        return query select d.id, d.status, false from durable.cancel_descendants(asked) d;
    end if;
end;
$$;

create or replace function durable.tasks_after_update() returns trigger
language plpgsql as $$
declare
    freed text[];
    keyed text[];
    done bigint[];
    parents bigint[];
    ended bigint[];
    q text;
    t bigint;
begin
    if current_setting('durable.claiming', true) = 'on' then
        -- A claim's update (durable.claim flags it): its rows are all running, which
        -- none of the conditions below looks for. Skipping the pass spares the claim a
        -- query.
        return null;
    end if;
    -- One pass over the new rows, never a join with the old ones: a join of two
    -- transition tables is planned blind (the planner takes each for one row) and turns
    -- quadratic in the batch. So each condition reads the row's new state only: a row
    -- updated again in a state it was already in (rare) sends a spare, harmless notice.
    -- Work becoming ready is announced by tasks_notify_ready, row by row.
    select array_agg(distinct n.queue) filter (
               where n.status not in ('running', 'queued')),
           array_agg(distinct n.queue) filter (
               where n.status not in ('running', 'queued') and n.concurrency_key is not null),
           array_agg(n.id) filter (
               where n.notify_finish and n.status in ('completed', 'failed', 'cancelled')),
           array_agg(distinct n.parent_id order by n.parent_id) filter (
               where n.parent_id is not null
                 and n.status in ('completed', 'failed', 'cancelled')),
           array_agg(n.id) filter (where n.status = 'cancelled')
      into freed, keyed, done, parents, ended
      from new_rows n where n.status not in ('running', 'queued');
    if ended is not null and current_setting('durable.cascading', true) is distinct from 'on'
    then
        -- 0013: whatever path ended a task cancelled (a cancel, or an attempt that ended
        -- after one was requested), its descendants go with it, including children
        -- started after the cancel's own cascade ran.
        perform durable.cancel_descendants(ended);
    end if;
    if freed is not null then
        -- A slot under a fleet-wide or per-key limit came free: claimers may wait for it.
        for q in
            select k from unnest(keyed) k
            union
            select c.name from durable.queues c
             where c.name = any(freed) and c.concurrency is not null
        loop
            perform pg_notify('durable_ready', q);  -- a repeat within a transaction is dropped
        end loop;
    end if;
    if done is not null then
        foreach t in array done loop
            perform pg_notify('durable_done', t::text);
        end loop;
    end if;
    if parents is not null then
        perform durable.wake_waiting(parents);
    end if;
    return null;
end;
$$;

create or replace function durable.suspend(
    task bigint, token bigint, br integer, children bigint[], wake timestamptz,
    event_name text
) returns text
language plpgsql as $$
declare
    ready boolean := false;
    cancelling boolean;
begin
    select t.cancel_requested into cancelling from durable.tasks t
     where t.id = task and t.claim_token = token and t.status = 'running' for update;
    if not found then
        return null;
    end if;
    if cancelling then
        -- Its descendants are cancelled by tasks_after_update (durable.cancel_descendants).
        update durable.tasks t
           set status = 'cancelled', finished_at = now(), wake_at = null, waiting_on = null,
               waiting_event = null, claim_token = null, lease_until = null, worker_id = null
         where t.id = task;
        return 'cancelled';
    end if;
    if children is not null then
        -- A child finishing now runs wake_waiting, which may still see this task running
        -- and not wake it; and the check below may not see that child's uncommitted
        -- finish. The lock wake_waiting takes too orders them: either the child committed
        -- before the check's snapshot, or it wakes the task after this commits. (An
        -- advisory lock, not the children's rows: row locks would deadlock with heartbeats.)
        perform pg_advisory_xact_lock(1685418593, (task % 2147483648)::integer);
        if not exists (
            select 1 from durable.tasks c
            where c.id = any(children) and c.status not in ('completed', 'failed', 'cancelled'))
        then
            ready := true;
        end if;
    end if;
    if event_name is not null and exists (
        select 1 from durable.signals s
        where s.task_id = task and s.name = event_name
          and not exists (select 1 from durable.events e
                          where e.task_id = task and e.branch = br and e.signal_id = s.id))
    then
        ready := true;
    end if;
    if wake is not null and wake <= now() then
        ready := true;
    end if;
    update durable.tasks t
       set status = case when ready then 'queued' else 'waiting' end,
           run_at = now(),
           wake_at = case when ready then null else wake end,
           waiting_on = case when ready then null else children end,
           waiting_event = case when ready then null else event_name end,
           claim_token = null, lease_until = null, worker_id = null
     where t.id = task;
    return case when ready then 'queued' else 'waiting' end;
end;
$$;

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
    -- A period past any timestamp's range (a row written by hand) means "per forever":
    -- clamped to 30 years rather than failing every claim of the queue (0013).
    period := least(period, 946080000);
    -- A transaction-level advisory lock: it serialises this queue's claimers without
    -- writing to any row.
    if conc is not null or rate is not null then
        perform pg_advisory_xact_lock(hashtextextended('durable.queue:' || q, 0));
    end if;
    if keyed then
        -- 0013: a key's limits count its running tasks in every queue, so the claimers of
        -- keyed tasks serialise across queues: one lock for all of them, always taken
        -- after the queue's own (the order rules out a deadlock between the two).
        perform pg_advisory_xact_lock(hashtextextended('durable.keys', 0));
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
                -- Keyed tasks only under the keys' lock, by the branch below (0013): one
                -- committed after the first statement looked would escape its limits.
                select t.id, t.started_at from durable.tasks t
                where t.queue = q and t.status = 'queued' and t.priority = level
                  and t.run_at <= now() and t.name = any(names)
                  and t.concurrency_key is null
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
                   and l.at > now() - make_interval(
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
        -- The status again, on the locked row (0013): a row that another claim or a
        -- cancel changed after this statement's snapshot is re-checked by these conditions
        -- once its lock is granted, and the join's alone would let it through.
        select t.id, t.started_at from durable.tasks t join chosen using (id)
         where t.status = 'queued'
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

create or replace function durable.claim_delay(q text) returns double precision
language sql stable as $$
    -- The period clamped as durable.claim clamps it (0013).
    select extract(epoch from (min(l.at) + make_interval(secs => least(c.rate_period, 946080000))
                               - now()))
      from durable.queues c
      join durable.rate_log l on l.bucket = 'q:' || c.name
     where c.name = q and c.rate_limit is not null
       and l.at > now() - make_interval(secs => least(c.rate_period, 946080000))
     group by c.rate_period, c.rate_limit
    having count(*) >= c.rate_limit
$$;
