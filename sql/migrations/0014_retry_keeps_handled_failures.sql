-- A retry (durable retry, and the automatic retry of a workflow) drops only the failure
-- that ended the attempt: the events its stored error names under `replay`, when nothing
-- was recorded after the workflow saw them, and children that failed or were cancelled
-- before the workflow saw their outcome. Failures the workflow caught stay in its log, so
-- the next attempt takes the same branches (before, every failed event was dropped).

create or replace function durable.restart(task bigint, mode text, at integer default null)
returns integer
language plpgsql as $$
declare
    cur record;
    new_branch integer;
begin
    select t.status, t.branch, t.error into cur from durable.tasks t where t.id = task for update;
    if not found then
        raise exception 'no task %', task using errcode = 'P0002';
    end if;
    if cur.status not in ('completed', 'failed', 'cancelled') then
        raise exception 'task % is %: only a finished task can be restarted (cancel it first)',
            task, cur.status using errcode = '55000';
    end if;
    if mode = 'retry' then
        new_branch := cur.branch;
        delete from durable.events e
         where e.task_id = task and e.branch = cur.branch
           and ((e.status = 'failed'
                 and e.seq in (select p::integer from jsonb_array_elements_text(
                                   cur.error -> 'replay' -> 'positions') as p)
                 and not exists (select 1 from durable.events x
                                  where x.task_id = task and x.branch = cur.branch
                                    and x.seq >= (cur.error -> 'replay' ->> 'at')::integer))
                or (e.kind = 'child' and e.status = 'pending'
                    and exists (select 1 from durable.tasks c
                                where c.id = e.child_id and c.status in ('failed', 'cancelled')))
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
    update durable.tasks t
       set status = 'queued', run_at = now(), attempt = t.attempt + 1,
           attempt_budget = coalesce(t.attempt_budget, t.max_attempts),
           max_attempts = t.attempt + coalesce(t.attempt_budget, t.max_attempts),
           result = null, error = null,
           finished_at = null, branch = new_branch, cancel_requested = false,
           wake_at = null, waiting_on = null, waiting_event = null, worker_id = null,
           claim_token = null, lease_until = null
     where t.id = task;
    return new_branch;
end;
$$;
