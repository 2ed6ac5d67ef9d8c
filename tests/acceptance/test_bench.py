"""`durable bench` as a user runs it, at a size that takes seconds: every workload runs,
checks its own count, reports its figures and leaves no scratch database behind."""

from __future__ import annotations

import json
import subprocess
from functools import partial

import anyio
import pytest

from tests.support.helpers import durable_cli, fetchval

WORKLOADS = ["throughput", "latency", "floor", "workflows", "backlog", "scale"]


async def bench(server_dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return await anyio.to_thread.run_sync(
        partial(
            durable_cli, "bench", "--database-url", server_dsn, *args, timeout=240,
            DURABLE_LOG_LEVEL="warning",
        )
    )


async def scratch_databases(server_dsn: str) -> int:
    return int(
        await fetchval(
            server_dsn, "select count(*) from pg_database where datname like 'durable_bench_%'"
        )
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_every_workload_runs_verifies_its_count_and_cleans_up(server_dsn: str) -> None:
    before = await scratch_databases(server_dsn)
    proc = await bench(
        server_dsn, *WORKLOADS, "--json", "--tasks", "400", "--concurrency", "8",
        "--latency-tasks", "30", "--rate", "300", "--workflows", "80", "--history", "3000",
        "--queued", "400", "--scheduled", "500",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["server_version"]
    results = {r["workload"]: r for r in report["results"]}
    assert list(results) == WORKLOADS
    assert all(r["verified"] for r in results.values())

    t = results["throughput"]["figures"]
    assert t["tasks"] == 400 and t["concurrency"] == 8
    assert t["drain_per_s"] > 0 and t["enqueue_per_s"] > 0 and t["startup_ms"] >= 0
    assert 0 < t["rss_mb"] < 1024
    lat = results["latency"]["figures"]
    assert lat["tasks"] == 30
    assert 0 < lat["p50_ms"] <= lat["p95_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    fl = results["floor"]["figures"]
    assert fl["tasks"] == 30 and fl["rate_per_s"] == 300
    assert 0 < fl["p50_ms"] <= fl["p95_ms"] <= fl["p99_ms"] <= fl["max_ms"]
    w = results["workflows"]["figures"]
    assert w["workflows"] == 80 and w["steps"] == 3
    assert w["steps_per_s"] == pytest.approx(3 * w["workflows_per_s"], rel=0.01)
    b = results["backlog"]["figures"]
    assert b["history"] == 3000 and b["queued"] == 400 and b["drain_per_s"] > 0
    assert b["scheduled"] == 500  # and verified: all 500 still queued, none ran
    s = results["scale"]["figures"]
    assert all(s[f"daemons_{k}_per_s"] > 0 for k in (1, 2, 4))
    assert s["ratio_2_to_1"] == pytest.approx(s["daemons_2_per_s"] / s["daemons_1_per_s"], abs=0.01)
    # The drain alone, once every daemon serves: one daemon always has all of it; with
    # more, the first may have drained everything before the last one claimed.
    assert s["drain_1_per_s"] > s["daemons_1_per_s"]
    assert all(s[f"drain_{k}_per_s"] is None or s[f"drain_{k}_per_s"] > 0 for k in (2, 4))
    if s["drain_2_per_s"] is not None:
        assert s["drain_ratio_2_to_1"] == pytest.approx(
            s["drain_2_per_s"] / s["drain_1_per_s"], abs=0.01
        )
    assert await scratch_databases(server_dsn) == before


async def test_the_table_names_each_workload_and_its_verdict(server_dsn: str) -> None:
    proc = await bench(
        server_dsn, "throughput", "workflows", "--tasks", "200", "--workflows", "30",
        "--steps", "2", "--concurrency", "4",
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("durable bench on PostgreSQL ")
    assert lines[1].startswith("throughput ") and "tasks=200" in lines[1]
    assert lines[2].startswith("workflows ") and "steps=2" in lines[2]
    assert all(line.endswith("verified=yes") for line in lines[1:3])


@pytest.mark.timeout(180)
async def test_retention_samples_sizes_and_claims_while_pruning_and_cleans_up(
    server_dsn: str,
) -> None:
    proc = await bench(
        server_dsn, "retention", "--json", "--ingest-rate", "200", "--duration", "4s",
        "--keep", "1s", "--every", "1s", "--retention-vacuum", "on", "--concurrency", "8",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (result,) = json.loads(proc.stdout)["results"]
    assert result["workload"] == "retention" and result["verified"]
    f = result["figures"]
    assert (f["rate_per_s"], f["seconds"], f["retention_s"]) == (200.0, 4.0, 1.0)
    assert f["samples"] >= 3
    assert "->" in f["tasks_ready_idx_kb"] and "->" in f["events_kb"]
    header, *rows = result["notes"]
    assert header.split()[:3] == ["t", "tasks", "queued"]
    assert len(rows) == f["samples"]
    # The daemon pruned during the run: the column of tasks pruned so far grows.
    assert int(rows[-1].split()[6]) > 0, rows


@pytest.mark.timeout(300)
async def test_the_entity_workload_reports_warm_and_cold_resumes_by_log_length(
    server_dsn: str,
) -> None:
    proc = await bench(server_dsn, "entity", "--json", "--entity-events", "60")
    assert proc.returncode == 0, proc.stderr
    results = {r["workload"]: r for r in json.loads(proc.stdout)["results"]}
    assert list(results) == ["entity-warm", "entity-cold"]
    assert all(r["verified"] for r in results.values())
    warm, cold = results["entity-warm"]["figures"], results["entity-cold"]["figures"]
    assert warm["events"] == cold["events"] == 60
    assert warm["delivery_ms_0_60"] > 0 and cold["settle_ms_0_60"] > 0
    # 30 resumes: warm ones read their own pending wait, cold ones the whole log.
    assert (warm["warm"], warm["cold"], warm["events_loaded"]) == (30, 0, 30)
    assert (cold["warm"], cold["cold"]) == (0, 30)
    assert cold["events_loaded"] == sum(2 * k - 1 for k in range(1, 31))  # the log so far
