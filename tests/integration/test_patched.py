"""`ctx.patched` and `ctx.deprecate_patch` over real suspended runs: the code is changed
while runs wait, and each run resumes on the branch its history fixes; then the patch is
deprecated and removed under runs that recorded its marker. `durable verify`'s replay
sees the same: it flags the one run the removal of the patch would break."""

from __future__ import annotations

import uuid
from collections import Counter

import pytest

import durable
from durable.admin import Admin
from durable.verify import check_history
from tests.support.helpers import fetchval, running_daemon, wait_for

QUEUE = "patching"
CODE = {"v": 1}
"""The deployed code: 1 before the patch, 2 with `patched`, 3 `deprecate_patch`, 4 without."""
RUNS: Counter[str] = Counter()


def count(key: str) -> int:
    RUNS[key] += 1
    return RUNS[key]


@durable.workflow(queue=QUEUE)
async def wf_patched(ctx: durable.Context, k: str) -> str:
    await ctx.step("a", count, f"{k}-a")
    await ctx.wait_for_event("first")
    v = CODE["v"]
    if v == 1:
        new = False
    elif v == 2:
        new = await ctx.patched("express")
    elif v == 3:
        await ctx.deprecate_patch("express")
        new = True
    else:
        new = True
    branch = "new" if new else "old"
    await ctx.step(branch, count, f"{k}-{branch}")
    await ctx.wait_for_event("go")
    await ctx.step("b", count, f"{k}-b")
    return branch


async def waits_for(client: durable.Client, task_id: int, event: str) -> None:
    async def check() -> bool:
        return (await client.get(task_id)).waiting_event == event

    await wait_for(check)


async def log_of(dsn: str, task_id: int) -> list[str]:
    return list(await fetchval(
        dsn, "select array_agg(kind || ':' || name order by seq) from durable.events "
        "where task_id = $1", task_id,
    ))  # fmt: skip


@pytest.mark.timeout(120)
async def test_runs_keep_the_branch_their_history_fixes_across_patch_deprecate_and_removal(
    dsn: str,
) -> None:
    CODE["v"] = 1
    k = uuid.uuid4().hex[:8]
    async with durable.connect(dsn) as client, running_daemon(dsn, queues=QUEUE):

        async def start(name: str, first: bool) -> int:
            h = await client.start(wf_patched, f"{k}-{name}")
            await waits_for(client, h.id, "first")
            if first:
                assert await client.send_event(h.id, "first")
                await waits_for(client, h.id, "go")
            return h.id

        async def finish(task_id: int, *events: str) -> str:
            for event in events:
                assert await client.send_event(task_id, event)
            return str(await client.result(task_id, timeout=30))

        old = await start("old", True)  # took the old branch on the old code
        before = await start("before", False)  # suspended before the patch point
        CODE["v"] = 2  # deploy the patch while both wait
        new = await start("new", True)
        later = await start("later", True)  # will see the cleanup
        assert await finish(old, "go") == "old"
        assert await finish(before, "first", "go") == "new"
        assert await finish(new, "go") == "new"
        CODE["v"] = 3  # cleanup: every run that took the old branch has finished
        assert await finish(later, "go") == "new"
        on_deprecate = await start("deprecated", True)
        CODE["v"] = 4  # the call removed
        assert await finish(on_deprecate, "go") == "new"
        fresh = await start("fresh", True)
        assert await finish(fresh, "go") == "new"

        histories = {h.task_id: h for h in await Admin(client.store).histories(["wf_patched"])}

    # Each step body ran once per run: the replays took every result from the log.
    for name in ("old", "before", "new", "later", "deprecated", "fresh"):
        branch = "old" if name == "old" else "new"
        assert (RUNS[f"{k}-{name}-a"], RUNS[f"{k}-{name}-{branch}"], RUNS[f"{k}-{name}-b"]) == (1, 1, 1)
    assert await log_of(dsn, old) == ["step:a", "event:first", "step:old", "event:go", "step:b"]
    marked = ["step:a", "event:first", "patch:express", "step:new", "event:go", "step:b"]
    for task_id in (before, new, later, on_deprecate):
        assert await log_of(dsn, task_id) == marked
    assert await log_of(dsn, fresh) == ["step:a", "event:first", "step:new", "event:go", "step:b"]

    # On the code without the patch, the replay flags the one run that took the old branch.
    verdicts = {i: await check_history(wf_patched, h) for i, h in histories.items()}
    assert {i for i, v in verdicts.items() if not v.ok} == {old}
    assert verdicts[old].position == 2
    assert str(verdicts[old].recorded).startswith("step 'old'")
    # Back on the patched code, only the run recorded after the removal (no marker, the
    # new branch) does not fit: the patch reads False for it.
    CODE["v"] = 2
    verdicts = {i: await check_history(wf_patched, h) for i, h in histories.items()}
    assert {i for i, v in verdicts.items() if not v.ok} == {fresh}
