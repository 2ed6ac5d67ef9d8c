-- 0010: two costs taken off the hot path.
--
-- Checkpoints travel with their times as seconds since the epoch. A timestamptz parameter
-- costs the daemon more to encode than the rest of the row's fields together; a double
-- precision costs next to nothing, and to_timestamp turns it back on the server.
-- durable.checkpoint_row stays for the daemons of the previous release during a rolling
-- deploy.
create type durable.checkpoint_epoch_row as (
    task_id     bigint,
    token       bigint,
    branch      integer,
    seq         integer,
    kind        text,
    name        text,
    digest      text,
    status      text,
    result      text,
    error       text,
    attempt     integer,
    started_at  double precision,
    wake_at     double precision
);

-- parent_id loses its foreign key. The key's check ran for every task inserted, as a
-- trigger event queued and fired per row even when parent_id is null (most tasks): about
-- a fifth of a bulk insert's server time. A child is inserted only in its running
-- parent's fenced transaction, which locks the parent's row before it commits, so the
-- reference holds when written; what ON DELETE SET NULL did is done by the delete trigger
-- below, once per statement.
alter table durable.tasks drop constraint tasks_parent_id_fkey;

create or replace function durable.tasks_after_delete() returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp as $$
begin
    delete from durable.events e using old_rows o where e.task_id = o.id;
    -- The children of a deleted task lose their parent, and only then: an update that
    -- matches no row still fires the update trigger's pass.
    if exists (select 1 from durable.tasks t join old_rows o on t.parent_id = o.id) then
        update durable.tasks t set parent_id = null from old_rows o where t.parent_id = o.id;
    end if;
    return null;
end;
$$;
