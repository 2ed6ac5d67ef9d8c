"""Tags and attributes: set at start (Python, SQL, CLI), validated where they come in,
searched through their GIN indexes by `durable ls` and the dashboard's task list."""

from __future__ import annotations

import asyncpg
import pytest

import durable
from durable.admin import Admin
from durable.models import TaskFilter
from durable.store import named_queries
from durable.validation import InvalidValue, attribute_pair, labels
from tests.support.helpers import durable_cli, fetchval


@durable.task
async def ql_noop() -> None:
    return None


async def test_start_with_tags_and_attributes_is_searchable(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        vip = await client.start(ql_noop, tags=["vip", "eu", "vip"], attributes={"region": "eu", "tries": 3})
        plain = await client.start(ql_noop)
        keyed = await client.start(ql_noop, tags=["vip"], idempotency_key="k-1")
        again = await client.start(ql_noop, tags=["other"], idempotency_key="k-1")
        assert keyed.created and not again.created and again.id == keyed.id
        search = client.store.dashboard.search_tasks
        assert [t.id for t in await search(TaskFilter(tags=("vip",)))] == [keyed.id, vip.id]
        assert [t.id for t in await search(TaskFilter(tags=("vip", "eu")))] == [vip.id]
        assert [t.id for t in await search(TaskFilter(attributes={"tries": 3}))] == [vip.id]
        # A number is not the string of its digits.
        assert await search(TaskFilter(attributes={"tries": "3"})) == []
        assert [t.id for t in await search(TaskFilter(idempotency_key="k-1"))] == [keyed.id]
        assert [t.id for t in await search(TaskFilter(task_id=plain.id))] == [plain.id]
        row = (await search(TaskFilter(task_id=vip.id)))[0]
        assert row.tags == ("eu", "vip") and row.attributes == {"region": "eu", "tries": 3}
        # Keyset pagination: the page below an id.
        assert [t.id for t in await search(TaskFilter(), before=keyed.id, limit=1)] == [plain.id]
        assert await client.store.dashboard.task_labels(plain.id) == ((), {})


@pytest.mark.parametrize(
    ("tags", "attributes", "message"),
    [
        ("vip", None, "tags must be a list of strings"),
        ([""], None, "a tag must be a string of 1 to 100 characters"),
        (["x" * 101], None, "a tag must be a string of 1 to 100 characters, got 101"),
        ([str(i) for i in range(21)], None, "tags: at most 20 a task, got 21"),
        (["a\0b"], None, "a tag must not contain NUL"),
        (None, ["region"], "attributes must be a dict"),
        (None, {"r": [1]}, "attribute 'r' must be a string"),
        (None, {"r": {"a": 1}}, "attribute 'r' must be a string"),
        (None, {"r": float("nan")}, "attribute 'r' must be a finite number"),
        (None, {"r": "x" * 501}, "attribute 'r' must be a string of 1 to 500 characters"),
        (None, {"x" * 101: 1}, "an attribute name must be a string of 1 to 100"),
        (None, {str(i): i for i in range(21)}, "attributes: at most 20 a task, got 21"),
    ],
)
def test_labels_are_refused_at_entry_in_one_line(tags: object, attributes: object, message: str) -> None:
    with pytest.raises(InvalidValue) as caught:
        labels(tags, attributes)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_limits_are_inclusive() -> None:
    tags = [str(i) for i in range(20)]
    attrs: dict[str, str | int | float | bool] = {str(i): "x" * 500 for i in range(20)}
    assert labels(tags, attrs) == (sorted(tags), attrs)
    assert labels(["x" * 100], {"x" * 100: ""}) == (["x" * 100], {"x" * 100: ""})
    assert labels([], {}) == (None, None)


def test_attribute_pairs() -> None:
    assert attribute_pair("region=eu=west") == ("region", "eu=west")
    assert attribute_pair("tries:=3") == ("tries", 3)
    assert attribute_pair("paid:=true") == ("paid", True)
    for bad in ("region", "=x", "a:=[1]", "a:=x"):
        with pytest.raises(InvalidValue):
            attribute_pair(bad)


async def test_sql_tag_in_the_starting_transaction(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        task = await conn.fetchval(
            "select durable.tag(durable.start('ql_noop', allow_unknown => true), array['b', 'a'], '{\"region\": \"eu\"}')"
        )
        # Tags add up as a set, attributes merge.
        await conn.execute("select durable.tag($1, array['a', 'c'], '{\"tries\": 2}')", task)
        row = await conn.fetchrow("select tags, attributes::text from durable.tasks where id = $1", task)
        assert row is not None
        assert list(row["tags"]) == ["a", "b", "c"]
        assert row["attributes"] == '{"tries": 2, "region": "eu"}'
        for call, message in [
            ("select durable.tag($1, array[''])", "a tag must be 1 to 100 characters"),
            ("select durable.tag($1, null, '[1]')", "attributes must be a JSON object"),
            ("select durable.tag($1, null, '{\"a\": [1]}')", 'attribute "a" must have'),
            (f"select durable.tag($1, array[{','.join(repr(str(i)) for i in range(20))}])",
             "at most 20 tags a task, got 23"),
        ]:
            with pytest.raises(asyncpg.InvalidParameterValueError, match=message):
                await conn.execute(call, task)
        await conn.execute("update durable.tasks set status = 'cancelled', finished_at = now() where id = $1", task)
        with pytest.raises(asyncpg.InvalidParameterValueError, match="no queued task"):
            await conn.execute("select durable.tag($1, array['late'])", task)
    finally:
        await conn.close()


async def test_cli_start_and_ls_by_tag_and_attribute(dsn: str) -> None:
    out = durable_cli("start", "ql_noop", "--allow-unknown", "--tag", "vip", "--attr", "region=eu", "--attr", "n:=2", dsn=dsn)
    task = int(out.stdout.strip())
    durable_cli("start", "ql_noop", "--allow-unknown", "--tag", "other", dsn=dsn)
    found = durable_cli("ls", "--tag", "vip", "--attr", "n:=2", "--json", dsn=dsn)
    rows = [line for line in found.stdout.splitlines() if line]
    assert len(rows) == 1 and f'"id": {task}' in rows[0] and '"region": "eu"' in rows[0]
    bad = durable_cli("ls", "--attr", "region", dsn=dsn)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "durable: --attr: expected name=value or name:=JSON, got 'region'"


async def explain_search(dsn: str, **given: object) -> str:
    """EXPLAIN of the task list's statement with these parameters, planned as the
    dashboard's pool plans it (for its parameters)."""
    order = ["statuses", "queue", "name", "since", "until", "key", "id", "tags", "attributes",
             "before", "limit", "floor"]
    conn = await asyncpg.connect(dsn, server_settings={"plan_cache_mode": "force_custom_plan"})
    try:
        await conn.execute(f"prepare search as {named_queries('dashboard.sql')['search_tasks']}")
        args = ", ".join(given.get(k, "null") for k in order)  # type: ignore[misc]
        rows = await conn.fetch(f"explain execute search({args})")
    finally:
        await conn.close()
    return "\n".join(r[0] for r in rows)


async def test_search_uses_the_indexes(dsn: str) -> None:
    """A tag or attribute filter reads its GIN index; an id or key its own index."""
    await fetchval(
        dsn,
        "insert into durable.tasks (queue, name, status, finished_at) "
        "select 'q', 'n', 'completed', now() from generate_series(1, 5000)",
    )
    await fetchval(dsn, "analyze durable.tasks")
    plan = await explain_search(dsn, tags="array['vip']", limit="50")
    assert "tasks_tags_idx" in plan, plan
    plan = await explain_search(dsn, attributes="'{\"a\": 1}'", limit="50")
    assert "tasks_attributes_idx" in plan, plan
    plan = await explain_search(dsn, key="'k-1'", limit="50")
    assert "tasks_idempotency_idx" in plan, plan
    plan = await explain_search(dsn, before="2500", limit="50")
    assert "tasks_pkey" in plan and "Seq Scan" not in plan, plan


async def test_a_filtered_page_reads_one_stretch_of_ids_then_leads_on(dsn: str) -> None:
    """The dashboard's list reads at most `stretch` ids a page: a filter matching nothing
    costs a bounded scan. A page that is not full says what it searched and where older
    tasks start, skipping ids that pruning left empty; the last stretch ends the list."""
    async with durable.connect(dsn) as client:
        ids = [r["id"] for r in await client.store.pool.fetch(
            "insert into durable.tasks (queue, name, status, finished_at) "
            "select 'q', case when g in (3, 56) then 'hit' else 'n' end, 'completed', now() "
            "from generate_series(1, 60) g order by g returning id"
        )]  # fmt: skip
        admin = Admin(client.store)
        hit = TaskFilter(name="hit")
        top = ids[-1] + 1
        page = await admin.search_page(hit, size=5, stretch=10)
        assert [t.id for t in page.rows] == [ids[55]]
        assert page.searched == (top - 10, top - 1) and page.next_before == top - 10
        # Pruned ids are skipped: the next stretch starts at the newest task left below.
        await client.store.pool.execute(
            "delete from durable.tasks where id = any($1::bigint[])", ids[3:40]
        )
        page = await admin.search_page(hit, before=page.next_before, size=5, stretch=10)
        assert page.rows == [] and page.searched == (top - 20, top - 11)
        assert page.next_before == ids[2] + 1
        page = await admin.search_page(hit, before=page.next_before, size=5, stretch=10)
        assert [t.id for t in page.rows] == [ids[2]] and page.next_before is None
        assert page.searched == (max(1, ids[2] + 1 - 10), ids[2])
        # No filter, or an exact lookup: the page fills from the index, no stretch.
        page = await admin.search_page(TaskFilter(), size=5, stretch=10)
        assert [t.id for t in page.rows] == ids[-1:-6:-1] and page.next_before == ids[-5]
        assert page.searched is None
        page = await admin.search_page(TaskFilter(task_id=ids[0]), size=5, stretch=10)
        assert [t.id for t in page.rows] == [ids[0]] and page.next_before is None
        # A full page of a filter leads on from its last row, as any keyset page.
        page = await admin.search_page(TaskFilter(name="n"), size=5, stretch=10)
        assert [t.id for t in page.rows] == [ids[59], ids[58], ids[57], ids[56], ids[54]]
        assert page.next_before == ids[54] and page.searched is None
