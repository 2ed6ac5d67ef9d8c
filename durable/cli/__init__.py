"""The `durable` command line: one module per group of commands, each importing only
`durable.cli.core`; tools (bench, soak, demo) load when their command runs."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from durable.cli import db, queues, run, schedules, show, tasks, tools, ui, verify
from durable.cli.core import CommandError, Parser
from durable.errors import ConfigurationError, DurableError
from durable.validation import InvalidValue
from durable.version import __version__

__all__ = ["CommandError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="durable",
        description="Durable execution for Python asyncio that lives entirely in Postgres.",
    )
    p.add_argument("--version", action="version", version=f"durable {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in (run, db, tasks, show, queues, schedules, tools, verify, ui):
        group.add_commands(sub)
    return p


def _fail(message: str, code: int) -> NoReturn:
    from durable.logs import redact

    print(f"durable: {redact(message)}", file=sys.stderr)
    raise SystemExit(code)


def _quiet_pipe() -> NoReturn:
    # The reader went away (`durable show 12 | head -1`): what is left to write goes
    # nowhere, and the interpreter's final flush must not fail again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    raise SystemExit(141)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_pipe()
    except CommandError as exc:
        _fail(str(exc), exc.code)
    except (ConfigurationError, InvalidValue) as exc:
        _fail(str(exc), 2)
    except (DurableError, ValueError) as exc:
        _fail(str(exc), 1)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception as exc:
        _fail(f"{type(exc).__name__}: {exc}", 1)
    raise SystemExit(code)
