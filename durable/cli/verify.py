"""`durable verify`: replay recorded workflow histories against the code installed now."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from durable.cli.core import (
    CommandError,
    Session,
    database_options,
    duration,
    duration_text,
    run,
    whole,
    with_session,
)
from durable.models import STATUSES

if TYPE_CHECKING:
    from durable.models import History
    from durable.registry import Registry
    from durable.verify import Verdict


def add_commands(sub: Any) -> None:
    v = sub.add_parser(
        "verify", help="replay recorded workflow histories against the code installed now",
        description="Replay the event logs of recorded workflow runs (each on its current "
        "branch) against the workflows the code loaded here defines, without running any "
        "step, transaction, child or sleep and without writing. Reports each run that would "
        "fail with its position, the recorded event and the call the code makes now. Exit "
        "status 1 when any run fails, 0 when all pass (or none matched).",
    )  # fmt: skip
    database_options(v)
    v.add_argument("--app", action="append", default=[], metavar="MODULE",
                   help="import MODULE for its workflows (besides the `durable` entry points)")
    v.add_argument("--name", action="append", metavar="NAME",
                   help="only runs of this workflow (repeatable; default: every workflow loaded)")
    v.add_argument("--status", action="append", choices=list(STATUSES),
                   help="only runs in this status (repeatable; default: any)")
    v.add_argument("--since", type=duration_text, help="only runs created within this long, e.g. 7d")
    v.add_argument("--limit", type=whole(1), default=1000, help="the newest N runs (default 1000)")
    v.add_argument("--file", action="append", metavar="PATH",
                   help="replay a history written by `durable show ID --json` instead of the "
                   "database's (repeatable)")
    v.add_argument("--json", action="store_true", help="one JSON line per run replayed")
    v.set_defaults(func=cmd_verify)  # fmt: skip


def _registry(apps: list[str]) -> Registry:
    from durable.errors import ConfigurationError
    from durable.registry import load

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # `--app mymodule` finds modules where it is run
    try:
        return load(apps)
    except ConfigurationError as exc:
        raise CommandError(str(exc), 2) from None


def cmd_verify(args: argparse.Namespace) -> int:
    from durable.verify import check_history, history_from_json

    registry = _registry(args.app)
    workflows = {d.name for d in registry.definitions() if d.kind == "workflow"}
    if args.name:
        unknown = [n for n in args.name if n not in workflows]
        if unknown:
            raise CommandError(
                f"--name {unknown[0]!r}: no workflow of that name in the code loaded (give "
                "--app MODULE, or install the package with the `durable` entry point)", 2,
            )  # fmt: skip
    names = sorted(args.name or workflows)
    if args.file:
        if any(getattr(args, k) is not None for k in ("status", "since")):
            raise CommandError("--file replays the files given: --status and --since do not apply", 2)
        from durable.errors import DurableError

        histories = []
        for path in args.file:
            try:
                h = history_from_json(path)
            except DurableError as exc:
                raise CommandError(str(exc), 2) from None
            if h.name not in workflows:
                raise CommandError(
                    f"{path}: no workflow named {h.name!r} in the code loaded (give --app MODULE)", 2
                )
            histories.append(h)
        selection = histories
    else:
        if not names:
            raise CommandError(
                "the code loaded defines no workflow: give --app MODULE, or install the package "
                "with the `durable` entry point", 2,
            )  # fmt: skip
        since = _since(args.since)

        async def select(s: Session) -> list[History]:
            return await s.admin.histories(names, statuses=args.status, since=since,
                                           limit=args.limit)  # fmt: skip

        selection = with_session(args, select)

    async def replay_all() -> list[Verdict]:
        return [
            await check_history(registry.get(h.name) or _missing(h.name), h,
                                registry_get=registry.get)
            for h in selection
        ]

    verdicts = run(replay_all) if selection else []
    return _report(args, names, verdicts)


def _missing(name: str) -> Any:
    raise CommandError(f"no workflow named {name!r} in the code loaded", 2)


def _since(text: str | None) -> Any:
    from datetime import UTC, datetime, timedelta

    return None if text is None else datetime.now(UTC) - timedelta(seconds=duration(text))


def _report(args: argparse.Namespace, names: list[str], verdicts: list[Verdict]) -> int:
    from durable.verify import explain

    failed = [v for v in verdicts if not v.ok]
    if args.json:
        for v in verdicts:
            print(json.dumps(v.as_dict()))
    else:
        for v in failed:
            print(f"FAIL {explain(v)}")
    if not verdicts:
        filters = [f"--status {s}" for s in args.status or []]
        filters += [f"--since {args.since}"] if args.since else []
        print(f"no recorded run of {', '.join(names)} matches{' ' if filters else ''}"
              f"{' '.join(filters)}: nothing to verify", file=sys.stderr)  # fmt: skip
        return 0
    where = "the files given" if args.file else "the database"
    print(f"verified {len(verdicts)} run(s) from {where} against the code loaded: "
          f"{len(verdicts) - len(failed)} passed, {len(failed)} failed",
          file=sys.stderr if args.json else sys.stdout)  # fmt: skip
    return 1 if failed else 0
