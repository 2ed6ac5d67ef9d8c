"""`durable show` of a workflow waiting on a wide fan-out: a count and the first few ids,
not thousands of them, and the ends of its event log (durable/cli/show.py)."""

from __future__ import annotations

import re
from functools import partial

import anyio

import durable
from durable.cli.show import SHOWN_EVENTS, SHOWN_IDS
from tests.apps import fan_out_app as app
from tests.support.helpers import durable_cli, fetchval, running_daemon, wait_status


async def test_show_counts_the_children_a_wide_wait_is_on(dsn: str) -> None:
    n = 1500
    async with durable.connect(dsn) as client:
        async with running_daemon(dsn, queues={app.QUEUE: 1}):  # children left queued
            handle = await client.start(app.gather, n)
            await wait_status(dsn, handle.id, "waiting")
        kids = await fetchval(dsn, "select waiting_on from durable.tasks where id = $1", handle.id)
        assert len(kids) == n

        outputs: dict[tuple[str, ...], str] = {}

        async def show(*flags: str) -> str:
            done = await anyio.to_thread.run_sync(
                partial(durable_cli, "show", str(handle.id), *flags, dsn=dsn)
            )
            assert done.returncode == 0, done.stderr
            outputs[flags] = done.stdout
            [line] = [x for x in done.stdout.splitlines() if x.startswith("waiting ")]
            return line

        first = ", ".join(map(str, kids[:SHOWN_IDS]))
        assert await show() == (
            f"waiting    1,500 children: {first} and {n - SHOWN_IDS:,} more (--full lists all)"
        )
        assert [int(x) for x in re.findall(r"\d+", await show("--full"))] == kids
        # The event log: one event a child, its ends and a count between them.
        seqs = await fetchval(
            dsn, "select array_agg(seq order by seq) from durable.events where task_id = $1",
            handle.id,
        )
        assert len(seqs) >= n

        def log(out: str) -> list[str]:
            lines = out.split("\nevent log, branch 0\n", 1)[1].splitlines()[1:]
            return [x.split()[0] for x in lines]

        shown = log(outputs[()])
        k = SHOWN_EVENTS
        assert shown == [*map(str, seqs[:k]), "...", *map(str, seqs[-k:])]
        assert f"{len(seqs) - 2 * k:,} more events (--full prints all)" in outputs[()]
        assert log(outputs[("--full",)]) == list(map(str, seqs))


async def test_show_lists_a_narrow_wait_whole(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        async with running_daemon(dsn, queues={app.QUEUE: 1}):
            handle = await client.start(app.gather, 3)
            await wait_status(dsn, handle.id, "waiting")
        kids = await fetchval(dsn, "select waiting_on from durable.tasks where id = $1", handle.id)
        done = await anyio.to_thread.run_sync(
            partial(durable_cli, "show", str(handle.id), dsn=dsn)
        )
    assert f"waiting    children {', '.join(map(str, kids))}\n" in done.stdout
