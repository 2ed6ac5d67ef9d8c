"""The verdict of ``durable soak``: the invariants, checked against the database and the
audit tables of ``soak.sql``; the figures; and the report, for people or as JSON."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from durable.tools.soak import Soak
    from durable.tools.soak.faults import Fault

SKEW = "-1h"
"""The wall clock of the fleet's last daemon, against the database's (libfaketime)."""

FAULTS = (
    "kill9", "pg_restart", "listener_kill", "zombie", "net_stall", "listener_cut",
    "login_refused", "bad_schedule", "bad_queue",
)  # fmt: skip
ENGINE_FAULT_EVENTS = ("runner_error", "daemon_failed")
"""Log events that mean durable itself went wrong (a violation whatever happened)."""
NOTED_EVENTS = (
    "lease_lost", "task_abandoned", "task_write_rejected", "leases_reclaimed",
    "listener_reconnected", "listener_ping_failed", "heartbeat_failed", "claim_failed",
    "task_outcome_not_written", "tasks_released", "task_retrying", "library_log",
    "listener_connect_failed", "task_cancel_requested", "task_cancelled", "schedule_invalid",
)  # fmt: skip


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    samples: list[Any] = field(default_factory=list)


async def verdict(soak: Soak, drained: bool, elapsed: float) -> dict[str, Any]:
    """Check every invariant against the database and gather the figures."""
    assert soak.sql is not None and soak.fleet is not None and soak.producer is not None
    sql, fleet, producer = soak.sql, soak.fleet, soak.producer
    ledger = producer.ledger
    keys = sorted(ledger)
    await sql.run(
        "record_started", keys, [ledger[k].kind for k in keys], [ledger[k].event for k in keys],
        [ledger[k].cancelled for k in keys], [ledger[k].raises for k in keys],
    )
    await sql.run("record_cancel_asked", producer.asked)
    await sql.run("record_cancels", [i for i, _ in producer.acked], [a for _, a in producer.acked])
    checks: list[Check] = []

    async def check(name: str, query: str, what: str) -> None:
        rows = await sql.rows(query)
        checks.append(Check(name, not rows, f"{len(rows)} {what}" if rows else "ok",
                            [_plain(r) for r in rows[:5]]))

    await check("no_task_lost", "check_lost", "started by a producer but missing")
    unfinished = await sql.rows("check_unfinished")
    checks.append(Check(
        "all_finished", drained and not unfinished,
        "ok" if not unfinished else f"{len(unfinished)} not finished after the drain",
        [_plain(r) for r in unfinished[:5]],
    ))  # fmt: skip
    await check("outcomes_as_intended", "check_outcomes", "ended otherwise than intended")
    await check("no_double_claim", "check_double_claims",
                "times a task was held by two live claims at once")
    await check("limits_held", "check_limits",
                "queues or keys ran more tasks at once than their limit")
    await check("acknowledged_cancels_honoured", "check_acked_cancels",
                "tasks not cancelled although a cancel was acknowledged while they were unfinished")
    await check("no_task_left_a_final_state", "check_left_final",
                "status changes out of completed, failed or cancelled")
    await check("no_suspend_spin", "check_suspend_spin",
                "tasks that suspended more than 30 times")
    await check("no_completion_twice", "check_completed_twice", "completed more than once")
    await check("completion_log", "check_completion_log",
                "completed tasks without exactly one completion")
    await check("no_step_rerun_after_checkpoint", "check_step_reruns",
                "step bodies started again after their checkpoint committed")
    await check("step_results_from_a_run", "check_step_results",
                "step results not produced by any run")
    await check("transactions_exactly_once", "check_business",
                "transactions without exactly one business row")
    await check("no_zombie_event_writes", "check_zombie_events",
                "event-log writes accepted from an attempt without the claim")
    await check("no_zombie_completions", "check_zombie_completions",
                "completions accepted from a process or attempt without the claim")
    await check("events_delivered", "check_events_delivered",
                "workflows that did not get the event sent to them")
    checks.append(Check(
        "faults_injected", not soak.fault_errors,
        "ok" if not soak.fault_errors else f"{len(soak.fault_errors)} faults failed to inject",
        [{"error": e} for e in soak.fault_errors[:5]],
    ))  # fmt: skip
    bad_exits = [(i, c) for i, c in fleet.exit_codes if c != 0]
    checks.append(Check(
        "no_daemon_exited_on_its_own", not fleet.unexpected and not bad_exits,
        "ok" if not fleet.unexpected and not bad_exits else
        f"{len(fleet.unexpected)} exited unasked; {len(bad_exits)} stopped with an error",
        [asdict(u) for u in fleet.unexpected[:5]] + [{"daemon": i, "code": c} for i, c in bad_exits],
    ))  # fmt: skip
    logs = _scan_logs([p for d in fleet.daemons for p in d.logs])
    engine = {e: logs["events"].get(e, 0) for e in ENGINE_FAULT_EVENTS}
    checks.append(Check(
        "no_engine_errors", not any(engine.values()) and not logs["unstructured"],
        "ok" if not any(engine.values()) and not logs["unstructured"] else
        f"{engine} and {len(logs['unstructured'])} unstructured output lines",
        logs["samples"][:5] + logs["unstructured"][:5],
    ))  # fmt: skip
    counts = Counter(f.kind for f in soak.faults)
    missing = [k for k in FAULTS if not counts[k]]
    checks.append(Check("every_fault_injected", not missing,
                        "ok" if not missing else f"never injected: {', '.join(missing)}"))
    stats = _plain((await sql.rows("stats"))[0])
    stats["stale_step_runs"] = await sql.value("stale_step_runs")
    return {
        "ok": all(c.ok for c in checks),
        "seed": soak.seed,
        "duration_s": soak.opts.duration,
        "elapsed_s": round(elapsed, 1),
        "daemons": soak.opts.daemons,
        "lease_s": soak.opts.lease,
        "skewed_daemon": {"daemon": fleet.daemons[-1].index, "clock": SKEW},
        "started": dict(Counter(s.kind for s in ledger.values())),
        "actions": dict(producer.actions),
        "faults": {k: counts[k] for k in FAULTS},
        "fault_log": [_fault_row(f) for f in soak.faults],
        "recovery": await _recovery(soak),
        "daemon_spawns": fleet.spawned,
        "stats": stats,
        "log_events": {e: logs["events"].get(e, 0) for e in NOTED_EVENTS},
        "checks": [asdict(c) for c in checks],
    }


async def _recovery(soak: Soak) -> dict[str, Any]:
    """How long the faults kept work away: for the daemons hit, seconds until each task
    they held changed hands; for restarts, seconds until the next completion."""
    assert soak.sql is not None
    out: dict[str, Any] = {}
    for kind in ("kill9", "zombie", "net_stall"):
        waits: list[float] = []
        for f in soak.faults:
            if f.kind != kind or not f.held:
                continue
            for r in await soak.sql.rows("released_at", f.held, f.at):
                if r["at"] is not None:
                    waits.append((r["at"] - f.at).total_seconds())
        out[f"{kind}_tasks_reclaimed_s"] = _summary(waits)
    for kind in ("pg_restart", "listener_kill"):
        waits = []
        for f in soak.faults:
            if f.kind == kind and f.ended is not None:
                at = await soak.sql.value("completions_after", f.ended)
                if at is not None:
                    waits.append((at - f.ended).total_seconds())
        out[f"{kind}_next_completion_s"] = _summary(waits)
    return out


def _plain(value: Any) -> Any:
    """Rows as JSON-friendly values."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if value is None or isinstance(value, int | float | str | bool):
        return value
    return str(value)


def _summary(values: list[float]) -> dict[str, Any] | None:
    if not values:
        return None
    return {"n": len(values), "median": round(statistics.median(values), 2),
            "max": round(max(values), 2)}


def _fault_row(f: Fault) -> dict[str, Any]:
    return {
        "kind": f.kind, "at": f.at.isoformat(timespec="milliseconds"), "daemon": f.daemon,
        "held": len(f.held), **f.detail,
    }  # fmt: skip


def _scan_logs(paths: list[Path]) -> dict[str, Any]:
    events: Counter[str] = Counter()
    unstructured: list[str] = []
    samples: list[Any] = []
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                unstructured.append(f"{path.name}: {line[:300]}")
                continue
            if not isinstance(record, dict):
                unstructured.append(f"{path.name}: {line[:300]}")
                continue
            event = str(record.get("event"))
            events[event] += 1
            if event in ENGINE_FAULT_EVENTS:
                samples.append({"log": path.name, **{k: str(v)[:500] for k, v in record.items()}})
    return {"events": events, "unstructured": unstructured, "samples": samples}


def _seconds(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return "-"
    return f"median {summary['median']}s max {summary['max']}s (n={summary['n']})"


def render(report: dict[str, Any]) -> str:
    """The report for people."""
    lines = [
        f"durable soak: {report['daemons']} daemons for {report['duration_s']:g}s "
        f"(elapsed {report['elapsed_s']:g}s with the drain), lease {report['lease_s']:g}s, "
        f"seed {report['seed']}, daemon {report['skewed_daemon']['daemon']} "
        f"at {report['skewed_daemon']['clock']}",
        "",
        "workload  " + "  ".join(f"{k}={v}" for k, v in sorted(report["started"].items()))
        + "  actions " + "  ".join(f"{k}={v}" for k, v in sorted(report["actions"].items())),
        "totals    " + "  ".join(f"{k}={v}" for k, v in report["stats"].items()),
        "faults    " + "  ".join(f"{k}={v}" for k, v in report["faults"].items())
        + f"  (daemon processes started: {report['daemon_spawns']})",
        "logged    " + "  ".join(f"{k}={v}" for k, v in report["log_events"].items()),
        "recovery  " + "  ".join(f"{k}={_seconds(v)}" for k, v in report["recovery"].items()),
        "",
        "fault log (time, kind, daemon, tasks it held, detail)",
        *(
            f"  {f['at'][11:23]}  {f['kind']:<13} {'-' if f['daemon'] is None else f['daemon']:>2}"
            f"  held={f['held']:<3} "
            + " ".join(f"{k}={v}" for k, v in f.items() if k not in ("at", "kind", "daemon", "held"))
            for f in report["fault_log"]
        ),
        "",
        "invariants",
    ]
    for c in report["checks"]:
        lines.append(f"  {'PASS' if c['ok'] else 'FAIL'}  {c['name']:<32} {c['detail']}")
        if not c["ok"]:
            lines += [f"          {json.dumps(s, default=str)[:400]}" for s in c["samples"]]
    lines.append("")
    failed = [c["name"] for c in report["checks"] if not c["ok"]]
    lines.append("RESULT: " + ("PASS" if not failed else f"FAIL ({', '.join(failed)})"))
    if report.get("home"):
        lines.append(f"logs and data kept in {report['home']}")
    return "\n".join(lines)
