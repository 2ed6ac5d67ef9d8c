-- 0021: fan-outs of thousands of children.
--
-- Each child finishing looked whether its waiting parent's waiting_on held it
-- (durable.wake_waiting): `f = any(r.waiting_on)` read the whole array, a toasted value
-- of 8 bytes per child fetched again for every child of the statement, and scanned it. A
-- gather of 10,000 children spent 1.6 s of its 2.5 s there, and the cost grew with the
-- square of the fan-out. Each child of the parent that finishes now counts down
-- waiting_left without the look; the look at zero keeps in waiting_on only the children
-- still unfinished, so a count that fell short (a child the parent does not wait for)
-- costs no more than the finishes that brought it down.

create or replace function durable.wake_waiting(ids bigint[], finished bigint[]) returns void
language plpgsql
set search_path = pg_catalog, pg_temp as $$
declare
    r record;
    left_ bigint;
    awaited bigint[];
    unfinished bigint[];
begin
    perform pg_advisory_xact_lock(1685418593, (p % 2147483648)::integer)
       from unnest(ids) as p order by p;
    perform 1 from durable.tasks where id = any(ids) and status = 'waiting'
        order by id for update;
    for r in
        -- With one parent (the usual statement), every finished child is its own.
        select p.id, p.waiting_left - case when cardinality(ids) = 1
                                           then cardinality(finished) else f.n end as left_
          from durable.tasks p
          left join (select c.parent_id, count(*) as n from durable.tasks c
                      where cardinality(ids) > 1 and c.id = any(finished)
                      group by c.parent_id) f on f.parent_id = p.id
         where p.id = any(ids) and p.status = 'waiting' and p.waiting_on is not null
         order by p.id
    loop
        left_ := r.left_;
        unfinished := null;
        if left_ is null or left_ <= 0 then
            -- The array read once, into a variable: used in place, a toasted value is
            -- fetched again at each use.
            select p.waiting_on into awaited from durable.tasks p where p.id = r.id;
            select coalesce(array_agg(c.id order by c.id), '{}') into unfinished
              from durable.tasks c
             where c.id = any(awaited) and c.status not in ('completed', 'failed', 'cancelled');
            left_ := cardinality(unfinished);
        end if;
        if left_ = 0 then
            update durable.tasks p
               set status = 'queued', run_at = now(), wake_at = null, waiting_on = null,
                   waiting_event = null, waiting_left = null
             where p.id = r.id;
        elsif cardinality(unfinished) < cardinality(awaited) then
            update durable.tasks p set waiting_left = left_, waiting_on = unfinished
             where p.id = r.id;
        else
            update durable.tasks p set waiting_left = left_ where p.id = r.id;
        end if;
    end loop;
end;
$$;
