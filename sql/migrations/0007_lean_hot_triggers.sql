-- Leaner hot statements, measured between single enqueues 10 ms apart.
--
-- A claim's update no longer runs the pass of tasks_after_update: durable.claim flags its
-- own update with a transaction-local setting, set just before the statement and cleared
-- just after (a claim inside a longer transaction leaves nothing behind), and the trigger
-- returns at once when it sees the flag. Its rows are all running, which the pass never
-- looks for. The claim also reads its queue's limits and whether keyed tasks wait in one
-- statement instead of two. Together: 0.07 ms of a claim's 0.94 ms round trip.
--
-- The insert trigger notifies in one statement instead of a loop over a query: a tenth
-- less time for a 5,000-task insert.

create or replace function durable.tasks_after_insert() returns trigger
language plpgsql as $$
begin
    -- One statement (no loop): a repeat of a (channel, payload) pair is delivered once.
    perform pg_notify('durable_ready', r.queue)
       from (select distinct n.queue from new_rows n where n.status = 'queued') r;
    return null;
end;
$$;

create or replace function durable.tasks_after_update() returns trigger
language plpgsql as $$
declare
    freed text[];
    keyed text[];
    done bigint[];
    parents bigint[];
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
                 and n.status in ('completed', 'failed', 'cancelled'))
      into freed, keyed, done, parents
      from new_rows n where n.status not in ('running', 'queued');
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
        -- The plain claim (unlimited queues take no lock), within any count above.
        perform set_config('durable.claiming', 'on', true);  -- see tasks_after_update
        return query
        with ready as (
            select t.id, t.started_at from durable.tasks t
            where t.queue = q and t.status = 'queued' and t.run_at <= now()
              and t.name = any(names)
            order by t.priority desc, t.id
            limit n
            for update skip locked
        )
        update durable.tasks t
           set status = 'running', claim_token = durable.new_token(),
               lease_until = now() + make_interval(secs => lease), worker_id = worker,
               started_at = coalesce(t.started_at, now())
          from ready
         where t.id = ready.id
        returning t.id, t.queue, t.name, t.kind, t.args::text, t.kwargs::text, t.attempt,
                  t.max_attempts, t.timeout, t.claim_token, t.branch, t.parent_id, t.root_id,
                  t.cancel_requested, ready.started_at is null;
        get diagnostics busy = row_count;  -- the rows RETURN QUERY returned
        perform set_config('durable.claiming', '', true);
        if rate is not null and busy > 0 then
            insert into durable.rate_log (bucket, at)
                select 'q:' || q, now() from generate_series(1, busy);
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
        select t.id, t.priority, t.concurrency_key,
               row_number() over (partition by t.concurrency_key
                                  order by t.priority desc, t.id) as rn
          from durable.tasks t
         where t.queue = q and t.status = 'queued' and t.run_at <= now()
           and t.name = any(names)
    ), chosen as (
        select r.id from ranked r left join keys k on k.key = r.concurrency_key
         where r.concurrency_key is null
            or (r.rn + k.running <= coalesce(k.key_limit, 2147483647)
                and r.rn + k.recent <= coalesce(k.key_rate_limit, 2147483647))
         order by r.priority desc, r.id
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
    select s.id, s.queue, s.name, s.kind, s.args::text, s.kwargs::text, s.attempt,
           s.max_attempts, s.timeout, s.claim_token, s.branch, s.parent_id, s.root_id,
           s.cancel_requested, s.fresh
      from started s;
    perform set_config('durable.claiming', '', true);
end;
$$;
