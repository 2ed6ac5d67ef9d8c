-- 0023: restarts.
--
-- durable.restart:
-- - A retry took the last failed event for the failure that ended the run whenever the
--   error named no positions, as errors stored before they did: after an expired lease
--   (the daemon killed) or a cancel it dropped a failure the workflow had handled, and the
--   retried run took another path. That rule is now kept for such old errors (no `attrs`).
-- - A fork copied the pending events of children that had failed or were cancelled (a
--   workflow cancelled on its child takes the child along): the new branch awaited them
--   and failed at once. A fork now runs them again, as a retry does.
-- - A restart of a task whose deadline had passed queued it to fail at its claim, over the
--   error the operator came to fix; a fork took a position past the end of the log for its
--   end; a plain task could be forked. Each is now refused in one line.
-- - Two restarts (or a start and a restart) giving one idempotency key of scope "active"
--   to two tasks at once: the later one failed on the key's unique index with a bare
--   unique_violation. It is refused as when the other task had committed first.

-- Run a finished task again: 'retry' keeps its history but the failure that ended it (the
-- events its error names under `replay`, when nothing was recorded after the workflow saw
-- them); 'replay' starts a new, empty branch; 'fork' starts a new branch holding the events
-- before position `at`. Retry and fork also run again the children the workflow had not
-- seen end that failed, were cancelled (or asked to stop) or were deleted. Returns the
-- branch. Refused, changing nothing: a task not finished; a run that continued as new
-- (ctx.continue_as_new: run again, it would start a second next run beside the chain's
-- own); a task whose deadline passed (its claim would fail it at once, over the error the
-- operator came to fix); a fork of a plain task (it has no event log); a fork position
-- outside its log; a task whose idempotency key of scope "active" another
-- unfinished task holds.
create or replace function durable.restart(task bigint, mode text, at integer default null)
returns integer
language plpgsql
set search_path = pg_catalog, pg_temp as $$
declare
    cur record;
    new_branch integer;
    other bigint;
    length_ integer;
begin
    -- Its unfinished children's rows first (the order of durable.lock_trees), then its
    -- own; the statements after see a child's outcome that committed meanwhile. A child
    -- whose failure was being written as the parent was retried was read as running: its
    -- event stayed, and the retried parent failed again with the child's old error.
    perform 1 from durable.tasks c
     where c.parent_id = task and c.status in ('queued', 'running', 'waiting')
     order by c.id desc
       for update;
    select t.status, t.branch, t.error, t.continued_as, t.active_key, t.kind, t.deadline
      into cur
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
    if mode = 'fork' and cur.kind <> 'workflow' then
        raise exception 'task % is a plain task, not a workflow: it has no event log to fork '
            '(retry runs it again)', task using errcode = '22023';
    end if;
    if cur.deadline <= now() then
        -- As Python prints the datetime (the deadline's own message, the client's value).
        raise exception 'task %''s deadline passed at %: it cannot run again (start a new task)',
            task, to_char(cur.deadline at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
                  || case when extract(microseconds from cur.deadline)::bigint % 1000000 = 0
                          then '' else to_char(cur.deadline at time zone 'UTC', '.US') end
                  || '+00:00'
            using errcode = '55000';
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
                -- An error stored before errors named their positions (nor held `attrs`):
                -- the last event, when it failed. Not an error that is no call's failure
                -- (an expired lease, a cancel, the workflow's own): the last event is then
                -- a failure the workflow handled, which stays.
                or (cur.error -> 'replay' is null and not (cur.error ? 'attrs')
                    and cur.error ->> 'type' <> 'durable.LeaseExpired'
                    and e.status = 'failed'
                    and e.seq = (select max(x.seq) from durable.events x
                                  where x.task_id = task and x.branch = cur.branch)));
    elsif mode in ('replay', 'fork') then
        select greatest(coalesce(max(e.branch), 0), cur.branch) + 1 into new_branch
          from durable.events e where e.task_id = task;
        if mode = 'fork' then
            select coalesce(max(e.seq) + 1, 0) into length_ from durable.events e
             where e.task_id = task and e.branch = cur.branch;
            if at is null or at < 0 or at > length_ then
                raise exception 'fork: at must be a position from 0 to % (the end of branch % '
                    'of task %''s event log), got %', length_, cur.branch, task,
                    coalesce(at::text, 'none') using errcode = '22023';
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
    -- Children the workflow had not seen end and that failed, were cancelled (a child
    -- asked to stop ends cancelled, whatever its attempt does) or were deleted: awaited,
    -- they would end the run again as they ended it (a workflow cancelled on its child
    -- takes the child along), so they run again. A child still running is kept, and
    -- awaited.
    delete from durable.events e
     where e.task_id = task and e.branch = new_branch and e.kind = 'child'
       and e.status = 'pending'
       and not exists (select 1 from durable.tasks c
                       where c.id = e.child_id and not c.cancel_requested
                         and c.status not in ('failed', 'cancelled'));
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
           debounce_key = null, debounce_until = null,
           active_key = null
     where t.id = task;
    if cur.active_key is not null then
        -- The key back, in a block of its own: the check above does not see a task given
        -- the key by a transaction not committed yet (a start, another restart), and the
        -- key's unique index, which waits for that transaction, then refuses the update.
        -- (Only keyed restarts pay for the block's subtransaction.)
        begin
            update durable.tasks t set active_key = cur.active_key where t.id = task;
        exception when unique_violation then
            select o.id into other from durable.tasks o
             where o.active_key = cur.active_key and o.id <> task
               and o.status in ('queued', 'running', 'waiting');
            raise exception 'task % has the idempotency key of task %, which has not '
                'finished: finish or cancel that one first', task, other using errcode = '55000';
        end;
    end if;
    return new_branch;
end;
$$;
