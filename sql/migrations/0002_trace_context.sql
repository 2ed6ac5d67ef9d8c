-- The trace context (W3C traceparent, as JSON) of whoever started a task, so that its
-- attempts' spans join the caller's trace; children store their parent's. Null when the
-- starter was not traced.
alter table durable.tasks add column trace_context jsonb;
