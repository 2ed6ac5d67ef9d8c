"""`durable bench floor`: the floor of a server and machine for enqueue-to-start latency.

A minimal queue on plain connections — an insert whose trigger notifies, a listener, a
`SKIP LOCKED` claim — with none of durable's guarantees (no leases, tokens, retries or
fencing), measured on the same schedule as the `latency` workload. What it reports is
what the server, the network and the machine's scheduler cost by themselves: run it
beside `latency` to see how much of durable's figure is durable's own.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from durable.store import connect

SCHEMA = """
create table floor_jobs (
    id bigint generated always as identity primary key,
    enqueued float8 not null,
    status text not null default 'queued'
);
create index floor_jobs_ready on floor_jobs (id) where status = 'queued';
create function floor_notify() returns trigger language plpgsql as $$
begin
    perform pg_notify('floor_jobs', '');
    return null;
end $$;
create trigger floor_jobs_notify after insert on floor_jobs
    for each statement execute function floor_notify();
"""

CLAIM = """
update floor_jobs set status = 'running'
 where id in (select id from floor_jobs where status = 'queued' order by id
              limit 32 for update skip locked)
returning id, enqueued
"""


async def measure(dsn: str, n: int, rate: float) -> tuple[list[float], int]:
    """Enqueue ``n`` jobs at ``rate`` per second; returns each one's enqueue-to-start
    seconds and how many the table holds finished."""
    setup = await connect(dsn)
    try:
        await setup.execute(SCHEMA)
    finally:
        await setup.close()
    listener, worker, finisher, client = [await connect(dsn) for _ in range(4)]
    latencies: list[float] = []
    woken = asyncio.Event()
    finished: asyncio.Queue[int] = asyncio.Queue()

    def on_notify(*_: Any) -> None:
        woken.set()

    async def claim_loop() -> None:
        while True:
            await woken.wait()
            woken.clear()
            while True:
                rows = await worker.fetch(CLAIM)
                for r in rows:  # the job's code: note when it started
                    latencies.append(time.time() - r["enqueued"])
                    finished.put_nowait(r["id"])
                if len(rows) < 32:
                    break

    async def finish_loop() -> None:
        while True:
            ids = [await finished.get()]
            while not finished.empty():
                ids.append(finished.get_nowait())
            await finisher.execute(
                "update floor_jobs set status = 'done' where id = any($1::bigint[])", ids
            )
            for _ in ids:
                finished.task_done()

    await listener.add_listener("floor_jobs", on_notify)
    loops = [asyncio.create_task(claim_loop()), asyncio.create_task(finish_loop())]
    try:
        start = time.monotonic()
        for i in range(n):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            await client.execute("insert into floor_jobs (enqueued) values ($1)", time.time())
        while len(latencies) < n:
            woken.set()  # a lost notification must not hang the run: look again
            await asyncio.sleep(0.01)
        await finished.join()
        done = int(await client.fetchval("select count(*) from floor_jobs where status = 'done'"))
    finally:
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        for conn in (listener, worker, finisher, client):
            await conn.close()
    return latencies, done
