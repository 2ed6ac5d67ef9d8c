-- 0009: a task whose deadline passes while it is queued or waiting fails then, whether or
-- not a daemon serves it (each daemon's timer loop looks, by this index).

-- Only tasks with a deadline that have not started running enter it: the rest cost it
-- nothing.
create index tasks_deadline_idx on durable.tasks (deadline)
    where deadline is not null and status in ('queued', 'waiting');
