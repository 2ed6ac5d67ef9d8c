-- The statements of the task list and the dashboard (durable/store/dashboard.py), by name
-- as in queries.sql. Each reads an index, never the whole table: the dashboard's pool
-- plans every statement for its parameters (plan_cache_mode = force_custom_plan), so a
-- filter left out (`$n is null`) drops out of the plan and one given can use its index.

-- name: search_tasks
-- The newest tasks matching the filters, below id $10 (keyset pagination: a page's last
-- id is the next page's $10), newest first. $1 statuses, $2 queue, $3 name, $4 created
-- since, $5 created before, $6 idempotency key, $7 id, $8 tags (all of them), $9
-- attributes (a JSON object the task's attributes contain), $11 the page's size, $12 the
-- lowest id to read (the dashboard reads one stretch of ids per page, so a filter that
-- matches little or nothing costs a bounded scan, not the whole table).
select id, queue, name, kind, status, attempt, max_attempts, parent_id, idempotency_key,
       created_at, started_at, finished_at, run_at, tags, attributes::text,
       error ->> 'type' as error_type
from durable.tasks
where ($1::text[] is null or status = any($1::text[]))
  and ($2::text is null or queue = $2::text)
  and ($3::text is null or name = $3::text)
  and ($4::timestamptz is null or created_at >= $4::timestamptz)
  and ($5::timestamptz is null or created_at < $5::timestamptz)
  and ($6::text is null or idempotency_key = $6::text)
  and ($7::bigint is null or id = $7::bigint)
  and ($8::text[] is null or tags @> $8::text[])
  and ($9::jsonb is null or attributes @> $9::jsonb)
  and ($10::bigint is null or id < $10::bigint)
  and ($12::bigint is null or id >= $12::bigint)
order by id desc
limit $11

-- name: newest_id_below
-- Where the next stretch of the task list starts: the newest id below $1 (null: none),
-- so that ids left empty by pruning are skipped in one step.
select max(id) from durable.tasks where ($1::bigint is null or id < $1::bigint)

-- name: finished_last_hour
-- Tasks that finished within the last hour, per queue, status and five-minute bucket
-- (0: the newest); reads tasks_finished_idx.
select queue, status,
       least(11, floor(extract(epoch from now() - finished_at) / 300))::int as bucket,
       count(*)::bigint as count
from durable.tasks
where finished_at > now() - interval '1 hour'
group by 1, 2, 3
order by 1, 2, 3

-- name: task_labels
select tags, attributes::text from durable.tasks where id = $1

-- name: children
-- A workflow's children (started by any branch), for the timeline's links.
select id, name, status, created_at, started_at, finished_at
from durable.tasks where parent_id = $1 order by id
limit 1000

-- name: task_progress
-- What a task page watches while the task runs: its status and how many events it has.
select t.status, t.attempt, t.branch,
       (select count(*) from durable.events e where e.task_id = t.id and e.branch = t.branch)
  from durable.tasks t where t.id = $1
