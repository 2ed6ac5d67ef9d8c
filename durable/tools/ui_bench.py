"""The dashboard's task list on a million finished tasks: `python -m durable.tools.ui_bench
--database-url URL` loads them (one INSERT ... SELECT generate_series) into a throwaway
database on that server, times each page of the task list as the dashboard reads it
(first page, deep keyset pages, each filter; a filtered page reads at most
durable.admin.STRETCH ids), and drops the database."""

from __future__ import annotations

import argparse
import secrets
import statistics
import time
from datetime import UTC, datetime

import anyio

from durable.admin import Admin
from durable.models import TaskFilter
from durable.store import Store, create_database, drop_database, migrate

LOAD = """
insert into durable.tasks (queue, name, status, args, result, created_at, started_at,
                           finished_at, tags, attributes)
select 'q' || (g % 4), 'job_' || (g % 10),
       case when g % 50 = 0 then 'failed' else 'completed' end, '[1]', '"ok"',
       now() - make_interval(secs => (1000000 - g) * 0.5),
       now() - make_interval(secs => (1000000 - g) * 0.5),
       now() - make_interval(secs => (1000000 - g) * 0.5 - 0.1),
       case when g % 1000 = 0 then array['vip'] end,
       case when g % 100 = 0 then jsonb_build_object('region', 'eu') end
from generate_series(1, 1000000) g
"""

FUTURE = datetime(2100, 1, 1, tzinfo=UTC)
CASES = [
    ("first page, no filter", TaskFilter(), None),
    ("first page, status=failed (2%)", TaskFilter(statuses=("failed",)), None),
    ("deep page (id < 500000), queue=q1, status=completed", TaskFilter(queue="q1", statuses=("completed",)), 500000),
    ("deep page, name=job_0, status=failed", TaskFilter(name="job_0", statuses=("failed",)), 500000),
    ("deep page, tag=vip (0.1%)", TaskFilter(tags=("vip",)), 500000),
    ("deep page, attribute region=eu (1%)", TaskFilter(attributes={"region": "eu"}), 500000),
    ("worst: deep page, a filter nothing matches", TaskFilter(name="job_3", statuses=("failed",)), 500000),
    ("worst: first page, a time range nothing matches", TaskFilter(since=FUTURE), None),
]


async def main(server: str, rounds: int) -> None:
    name = f"durable_uibench_{secrets.token_hex(4)}"
    await create_database(server, name)
    dsn = server.rsplit("/", 1)[0] + "/" + name
    try:
        await migrate(dsn)
        from durable.ui.server import DASHBOARD_SESSION

        store = await Store.open(dsn, server_settings=DASHBOARD_SESSION, max_size=2)
        admin = Admin(store)
        try:
            started = time.perf_counter()
            await store.pool.execute(LOAD)
            await store.pool.execute("vacuum analyze durable.tasks")
            print(f"loaded 1,000,000 finished tasks in {time.perf_counter() - started:.1f} s")
            for label, f, before in CASES:
                times, rows = [], 0
                for _ in range(rounds):
                    t = time.perf_counter()
                    page = await admin.search_page(f, before=before, size=50)
                    rows = len(page.rows)
                    times.append((time.perf_counter() - t) * 1000)
                print(f"{label:52s} rows {rows:3d}  median {statistics.median(times):6.1f} ms"
                      f"  max {max(times):6.1f} ms")  # fmt: skip
        finally:
            await store.close()
    finally:
        await drop_database(server, name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m durable.tools.ui_bench", description=__doc__)
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    anyio.run(main, args.database_url, args.rounds)
