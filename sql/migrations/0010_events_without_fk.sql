-- The event log loses its foreign key to durable.tasks; a statement trigger on durable.tasks
-- deletes a deleted task's events instead, as the key's ON DELETE CASCADE did.
--
-- The key checked every event as it was written: a query on the task's row, run through
-- a trigger queued per row, close to half of a checkpoint statement's server time
-- (20,000 three-step workflows: 1,985-2,078 ms in checkpoint statements with the key,
-- 1,070-1,080 without). Every statement that writes events already holds that row locked
-- (the checkpoint's fence, FOR SHARE; the fenced transactions, FOR UPDATE), so the row
-- cannot go away before the event commits, and the check found nothing the fence had not.

alter table durable.events drop constraint events_task_id_fkey;

create function durable.tasks_after_delete() returns trigger
language plpgsql as $$
begin
    delete from durable.events e using old_rows o where e.task_id = o.id;
    return null;
end;
$$;

create trigger tasks_delete_events after delete on durable.tasks
    referencing old table as old_rows
    for each statement execute function durable.tasks_after_delete();
