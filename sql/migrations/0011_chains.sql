-- 0011: a chain of runs keeps what its first run was given, and stays one chain.
--
-- ctx.continue_as_new carries the run's version, deadline, tags and attributes and its
-- idempotency key of scope "active" to the next run, and the events sent to the run that
-- it did not take (accepted by send_event, they were lost). durable.restart refuses a run
-- that continued (retried, it started a second next run: two live chains) and a task
-- whose idempotency key of scope "active" another unfinished task holds now (it failed on
-- the unique index), and forgets the task's debounce key (it failed on that index when a
-- newer task held the key); a retry also runs again the children of the workflow that no
-- longer exist (a tree pruned in part while the retry came: the workflow waited for ever
-- on a missing child), and drops a patch marker the log would end with (code from before
-- the patch stepped over it and recorded its own branch after it).

-- End a workflow's run and start its next one (ctx.continue_as_new): a new task of the
-- same name and options (version, deadline, labels, limits) with arguments
-- `new_args`/`new_kwargs` and an empty log, which takes over the idempotency key of
-- either scope and the events sent to this run that it did not take; the run ends
-- completed, `continued_as` the new one. The deadline is the chain's: it does not move.
-- Returns the new task's id; null when the claim token no longer matches; 0 when a
-- cancel was requested while the run went on (it ends cancelled and nothing starts).
create or replace function durable.continue_as_new(task bigint, token bigint,
                                                   new_args jsonb, new_kwargs jsonb)
returns bigint
language plpgsql
set search_path = pg_catalog, pg_temp as $$
declare
    cur durable.tasks;
    next_id bigint;
begin
    select * into cur from durable.tasks t
     where t.id = task and t.claim_token = token and t.status = 'running' for update;
    if not found then
        return null;
    end if;
    if cur.cancel_requested then
        update durable.tasks t
           set status = 'cancelled', finished_at = now(), claim_token = null,
               lease_until = null, worker_id = null
         where t.id = task;
        return 0;
    end if;
    -- The keys are unique: they leave this run before the next one takes them.
    update durable.tasks t set idempotency_key = null, active_key = null where t.id = task;
    insert into durable.tasks (queue, name, kind, args, kwargs, priority, max_attempts,
                               timeout, idempotency_key, active_key, concurrency_key,
                               key_limit, key_rate_limit, key_rate_period, trace_context,
                               notify_finish, continued_from, version, deadline, tags,
                               attributes)
    values (cur.queue, cur.name, cur.kind, new_args, new_kwargs, cur.priority,
            coalesce(cur.attempt_budget, cur.max_attempts), cur.timeout,
            cur.idempotency_key, cur.active_key, cur.concurrency_key, cur.key_limit,
            cur.key_rate_limit, cur.key_rate_period, cur.trace_context, cur.notify_finish,
            task, cur.version, cur.deadline, cur.tags, cur.attributes)
    returning id into next_id;
    -- Events sent to this run and not taken by it (send_event accepted them while it was
    -- the chain's current run) are the next run's too, in the order they were sent, with
    -- their idempotency keys: a producer that sends one again, to either run, delivers it
    -- once. No sender can add one meanwhile: send_event locks this row first, and then
    -- finds the run completed.
    insert into durable.signals (task_id, name, payload, created_at, idempotency_key)
    select next_id, s.name, s.payload, s.created_at, s.idempotency_key
      from durable.signals s
     where s.task_id = task
       -- Taken oldest first by name (see next_signal): the untaken ones of a name are
       -- those after the newest taken one.
       and s.id > coalesce((select e.signal_id from durable.events e
                             where e.task_id = task and e.branch = cur.branch
                               and e.name = s.name and e.signal_id is not null
                             order by e.signal_id desc
                             limit 1), 0)
     order by s.id;
    update durable.tasks t
       set status = 'completed', result = null, finished_at = now(), continued_as = next_id,
           claim_token = null, lease_until = null, worker_id = null
     where t.id = task;
    return next_id;
end;
$$;

-- Run a finished task again: 'retry' keeps its history but the failure that ended it (the
-- events its error names under `replay`, when nothing was recorded after the workflow saw
-- them, and children that failed, were cancelled or were deleted before it saw them:
-- those run again);
-- 'replay' starts a new, empty branch; 'fork' starts a new branch holding the events
-- before position `at`. Returns the branch. A run that continued as new (ctx.continue_as_new)
-- is refused: run again, it would start a second next run beside the chain's own.
create or replace function durable.restart(task bigint, mode text, at integer default null)
returns integer
language plpgsql
set search_path = pg_catalog, pg_temp as $$
declare
    cur record;
    new_branch integer;
    other bigint;
begin
    select t.status, t.branch, t.error, t.continued_as, t.active_key into cur
      from durable.tasks t where t.id = task for update;
    if not found then
        raise exception 'no task %', task using errcode = 'P0002';
    end if;
    if cur.status not in ('completed', 'failed', 'cancelled') then
        raise exception 'task % is %: only a finished task can be restarted (cancel it first)',
            task, cur.status using errcode = '55000';
    end if;
    if cur.continued_as is not null then
        raise exception 'task % continued as task %: restart the last run of its chain',
            task, cur.continued_as using errcode = '55000';
    end if;
    -- An idempotency key of scope "active" names one unfinished task at a time.
    select o.id into other from durable.tasks o
     where o.active_key = cur.active_key and o.id <> task
       and o.status in ('queued', 'running', 'waiting');
    if found then
        raise exception 'task % has the idempotency key of task %, which has not finished: '
            'finish or cancel that one first', task, other using errcode = '55000';
    end if;
    if mode = 'retry' then
        new_branch := cur.branch;
        delete from durable.events e
         where e.task_id = task and e.branch = cur.branch
           -- (A step's failed tries and its backoff sleeps are named together.)
           and (((e.status = 'failed' or e.kind = 'sleep')
                 and e.seq in (select p::integer from jsonb_array_elements_text(
                                   cur.error -> 'replay' -> 'positions') as p)
                 and not exists (select 1 from durable.events x
                                  where x.task_id = task and x.branch = cur.branch
                                    and x.seq >= (cur.error -> 'replay' ->> 'at')::integer))
                or (e.kind = 'child' and e.status = 'pending'
                    and not exists (select 1 from durable.tasks c
                                    where c.id = e.child_id
                                      and c.status not in ('failed', 'cancelled')))
                -- An error stored before errors named their positions: the last event,
                -- when it failed.
                or (cur.error -> 'replay' is null and e.status = 'failed'
                    and e.seq = (select max(x.seq) from durable.events x
                                  where x.task_id = task and x.branch = cur.branch)));
    elsif mode in ('replay', 'fork') then
        select greatest(coalesce(max(e.branch), 0), cur.branch) + 1 into new_branch
          from durable.events e where e.task_id = task;
        if mode = 'fork' then
            if at is null or at < 0 then
                raise exception 'fork needs a position >= 0' using errcode = '22023';
            end if;
            insert into durable.events
                (task_id, branch, seq, kind, name, digest, status, result, error, child_id,
                 signal_id, wake_at, attempt, started_at, finished_at)
            select e.task_id, new_branch, e.seq, e.kind, e.name, e.digest, e.status,
                   e.result, e.error, e.child_id, e.signal_id, e.wake_at, e.attempt,
                   e.started_at, e.finished_at
              from durable.events e
             where e.task_id = task and e.branch = cur.branch and e.seq < at;
        end if;
    else
        raise exception 'unknown restart mode %', mode using errcode = '22023';
    end if;
    -- A patch marker the log now ends with goes too: nothing recorded after it depends on
    -- its answer, and code from before the patch would step over it and record the old
    -- branch after it, a log no version of the code replays. The run asks again.
    delete from durable.events e
     where e.task_id = task and e.branch = new_branch and e.kind = 'patch'
       and not exists (select 1 from durable.events x
                        where x.task_id = task and x.branch = new_branch
                          and x.seq > e.seq and x.kind <> 'patch');
    update durable.tasks t
       set status = 'queued', run_at = now(), attempt = t.attempt + 1,
           attempt_budget = coalesce(t.attempt_budget, t.max_attempts),
           max_attempts = t.attempt + coalesce(t.attempt_budget, t.max_attempts),
           result = null, error = null,
           finished_at = null, branch = new_branch, cancel_requested = false,
           wake_at = null, waiting_on = null, waiting_event = null, worker_id = null,
           claim_token = null, lease_until = null,
           -- Run again, not started again: later debounced starts make a task of their own.
           debounce_key = null, debounce_until = null
     where t.id = task;
    return new_branch;
end;
$$;
