-- Queued tasks by when they become due. An idle queue loop asks when its next task is due
-- (next_due); without this index that read every queued task of the queue: 83 ms with
-- 200,000 tasks scheduled for tomorrow, on every idle wake-up of every daemon. Partial: a
-- task leaves it when it is claimed, so it costs one entry per enqueue.
--
-- The second condition is always true of a real run_at. It keeps claims off this index:
-- a partial index serves only a query whose conditions imply its own, and only next_due
-- states this one. Without it, a claim planned on statistics from before a backlog arrived
-- took this index for its queue column and sorted every queued task (a drain of 100,000
-- queued tasks fell from 10,000 to 1,300 tasks/s).
create index tasks_due_idx on durable.tasks (queue, run_at)
    where status = 'queued' and run_at > '-infinity';
