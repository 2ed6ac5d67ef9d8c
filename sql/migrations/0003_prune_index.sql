-- Every task of a workflow tree by its root, for `durable prune` and DURABLE_RETENTION:
-- a tree is deleted only once all of it has finished. Partial: top-level tasks (most of
-- them) cost nothing here.
create index tasks_root_idx on durable.tasks (root_id) where root_id is not null;
