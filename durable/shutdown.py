"""A daemon's shutdown: a stop flag, a bounded grace period, then bounded last writes."""

from __future__ import annotations

import asyncio
import math
import signal
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import anyio

from durable.logs import get_logger, redact
from durable.store import is_transient

log = get_logger("durable.shutdown")

FINAL_WRITES = 5.0
"""Seconds a shutdown gives its last writes once the grace period is over: outcomes still
being written, the hand-back of unfinished tasks, flushes in flight, the daemon's row and
the pool's close. A network path that stops answering never errors, so without a bound
those writes would hold the daemon until it is killed; a server that has not answered by
then is taken for unreachable, and the tasks' leases hand them over when they expire."""

STARTUP_BACKOFF = 10.0
"""Seconds between tries of a startup statement at most (see Shutdown.persist)."""


class Shutdown:
    """When a stop was asked for, how long running tasks may still take, and the scope
    every write that must survive the stop runs in."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.requested = anyio.Event()
        self.forced = anyio.Event()
        """A second stop: the grace period is skipped."""
        self.grace_deadline = math.inf
        self.final_deadline = math.inf

    def request(self) -> bool:
        """Record a stop; True for the first one (which starts the grace period)."""
        now = anyio.current_time()
        first = not self.requested.is_set()
        if first:
            # The grace period counts from the stop, and the last writes get FINAL_WRITES
            # after it: the whole shutdown is bounded, whatever the network does.
            self.grace_deadline = now + self.grace
            self.final_deadline = self.grace_deadline + FINAL_WRITES
        else:
            self.forced.set()
            self.final_deadline = min(self.final_deadline, now + FINAL_WRITES)
        self.requested.set()
        return first

    def grace_scope(self) -> anyio.CancelScope:
        """The grace period, from the stop (or from now: a burst that ran dry)."""
        grace = self.grace_deadline
        if grace == math.inf:
            grace = anyio.current_time() + self.grace
        return anyio.CancelScope(deadline=grace)

    def last_writes(self) -> anyio.CancelScope:
        """A scope for a write that must be made even while shutting down: shielded from
        cancellation, and bounded: by the shutdown's deadline for its last writes, or
        FINAL_WRITES from now outside a shutdown."""
        deadline = self.final_deadline
        if deadline == math.inf:
            deadline = anyio.current_time() + FINAL_WRITES
        return anyio.CancelScope(shield=True, deadline=deadline)

    async def persist(self, step: str, write: Callable[[], Awaitable[None]]) -> None:
        """``await write()``, a statement of the daemon's startup, tried again after errors
        a later try may get past, until it goes through or a stop is asked for. The pool
        has connected by then: the server is there, and a session lost under the statement
        (a backend terminated, a restart) is a blip to ride out, not a reason to exit."""
        delay = 0.1
        while True:
            try:
                await write()
                return
            except Exception as exc:
                if not is_transient(exc) or self.requested.is_set():
                    raise
                log.warning("startup_retrying", step=step, retry_in=round(delay, 2),
                            error=redact(f"{type(exc).__name__}: {exc}"))
                with anyio.move_on_after(delay):
                    await self.requested.wait()
                if self.requested.is_set():
                    raise
            delay = min(delay * 2, STARTUP_BACKOFF)


@contextmanager
def on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """SIGTERM and SIGINT call ``stop`` while the block runs. The block is the daemon's whole
    run, its last writes included: a signal then is a second stop, where the default
    action would kill it (SIGTERM) or raise a KeyboardInterrupt (SIGINT)."""
    loop = asyncio.get_running_loop()
    signums = (signal.SIGTERM, signal.SIGINT)

    def heard(signum: int) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        stop()

    for signum in signums:
        loop.add_signal_handler(signum, heard, signum)
    try:
        yield
    finally:
        for signum in signums:
            loop.remove_signal_handler(signum)
