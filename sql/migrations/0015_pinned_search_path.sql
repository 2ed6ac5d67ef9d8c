-- Every function in schema durable runs with search_path = pg_catalog, pg_temp.
--
-- A function runs with its caller's search_path unless it sets its own. The triggers run
-- with the path of whoever updates a task (an administrator cancelling from the command
-- line, a superuser's session) and call unnest, array_agg and pg_notify on domain-typed
-- and array values: a function planted in a schema on that path whose argument types
-- match better (public.unnest(text[]) against pg_catalog.unnest(anyarray)) ran in the
-- caller's name. Every table and function of durable is named with its schema, so the
-- path needs pg_catalog alone; pg_temp is named last so that no temporary object can
-- shadow a catalog one.
--
-- Generic over pg_proc rather than one ALTER per function: whatever an earlier migration
-- (re)created, with CREATE OR REPLACE that resets the setting, ends pinned.
--
-- Except durable.new_token(), called once per claimed row: a SET clause stops the planner
-- from inlining it (2.2 µs a call instead of 0.14 on PostgreSQL 15). Its body names every
-- function and operator with its schema instead, so that no search_path changes it.

create or replace function durable.new_token() returns bigint
language sql volatile parallel safe as $$
    select ((pg_catalog.random() operator(pg_catalog.*) 2147483648::double precision)::bigint
            operator(pg_catalog.<<) 31)
           operator(pg_catalog.#)
           (pg_catalog.random() operator(pg_catalog.*) 2147483648::double precision)::bigint
$$;

do $$
declare
    f regprocedure;
begin
    for f in
        select p.oid::regprocedure from pg_catalog.pg_proc p
         where p.pronamespace = 'durable'::regnamespace and p.prokind in ('f', 'p')
           and p.oid <> 'durable.new_token()'::regprocedure
         order by p.oid
    loop
        -- regprocedure prints the name and argument types quoted and schema-qualified.
        execute pg_catalog.format('alter routine %s set search_path = pg_catalog, pg_temp', f);
    end loop;
end;
$$;
