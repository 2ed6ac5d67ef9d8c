-- 0008: tags and attributes on tasks, set when a task starts and searched by the task list
-- (`durable ls --tag/--attr`, the dashboard); an index on finished_at for the dashboard's
-- per-hour throughput and the time range of finished tasks.

-- Null when a task has none, so that the tasks without any (most) cost the GIN indexes
-- nothing: partial indexes hold only the rows that have some.
alter table durable.tasks add column tags text[];
alter table durable.tasks add column attributes jsonb;

create index tasks_tags_idx on durable.tasks using gin (tags) where tags is not null;
create index tasks_attributes_idx on durable.tasks using gin (attributes jsonb_path_ops)
    where attributes is not null;
create index tasks_finished_idx on durable.tasks (finished_at) where finished_at is not null;

-- Tag a task from SQL in the transaction that started it (the task must still be queued):
--   select durable.tag(durable.start('fulfill', '["order-17"]'), array['vip'], '{"region": "eu"}');
-- Tags are added to the task's (a set); attributes are merged, a key given again replaced.
-- The limits are durable.validation's (tags_and_attributes), one line naming the field.
create function durable.tag(task_id bigint, tags text[] default null,
                            attributes jsonb default null)
returns bigint
language plpgsql
set search_path = pg_catalog, pg_temp as $$
#variable_conflict use_column
declare
    merged_tags text[];
    merged_attributes jsonb;
    bad text;
begin
    if tag.attributes is not null and jsonb_typeof(tag.attributes) <> 'object' then
        raise exception 'durable.tag: attributes must be a JSON object, not %',
            jsonb_typeof(tag.attributes) using errcode = '22023';
    end if;
    select x into bad from unnest(tag.tags) x
     where x is null or length(x) not between 1 and 100 limit 1;
    if found then
        raise exception 'durable.tag: a tag must be 1 to 100 characters, got %',
            coalesce(length(bad) || ' characters', 'null') using errcode = '22023';
    end if;
    select k into bad from jsonb_each(tag.attributes) a(k, v)
     where length(k) not between 1 and 100
        or jsonb_typeof(v) not in ('string', 'number', 'boolean')
        or (jsonb_typeof(v) = 'string' and length(v #>> '{}') > 500) limit 1;
    if found then
        raise exception 'durable.tag: attribute % must have a name of 1 to 100 characters and a string (at most 500 characters), number or boolean value',
            left(to_json(bad)::text, 120) using errcode = '22023';
    end if;
    select t.tags, t.attributes into merged_tags, merged_attributes
      from durable.tasks t where t.id = tag.task_id and t.status = 'queued' for update;
    if not found then
        raise exception 'durable.tag: no queued task %: tag a task in the transaction that starts it',
            tag.task_id using errcode = '22023';
    end if;
    merged_tags := array(select distinct x from unnest(coalesce(merged_tags, '{}') || coalesce(tag.tags, '{}')) x order by x);
    merged_attributes := coalesce(merged_attributes, '{}') || coalesce(tag.attributes, '{}');
    if cardinality(merged_tags) > 20 then
        raise exception 'durable.tag: at most 20 tags a task, got %', cardinality(merged_tags)
            using errcode = '22023';
    end if;
    if (select count(*) from jsonb_object_keys(merged_attributes)) > 20 then
        raise exception 'durable.tag: at most 20 attributes a task, got %',
            (select count(*) from jsonb_object_keys(merged_attributes)) using errcode = '22023';
    end if;
    update durable.tasks t
       set tags = nullif(merged_tags, '{}'),
           attributes = nullif(merged_attributes, '{}'::jsonb)
     where t.id = tag.task_id;
    return tag.task_id;
end;
$$;
