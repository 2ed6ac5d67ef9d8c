"""The fallback poll: one statement per poll interval for every queue a daemon serves.

A notification is only a hint and can be lost (sent while the listener reconnects), so
a daemon also looks for work every poll interval. It
asks once which of its queues have work due, or due before the next poll, and wakes
only those queue loops: an idle daemon sends the same statements whether it serves
one queue or five hundred, and a queue with nothing to do costs one index probe inside
that statement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import anyio

from durable.logs import Once, get_logger, redact
from durable.store import Store, is_fatal, is_transient
from durable.worker import QueueWorker

log = get_logger("durable.poller")


class Poller:
    """Wakes the queue loops whose queues have work due, every ``interval`` seconds and
    whenever asked (``poll_soon``: the listener is back and may have missed some)."""

    def __init__(
        self, workers: Mapping[str, QueueWorker], interval: float, deadline: float = 30.0
    ) -> None:
        self.workers = workers
        """The daemon's queue loops by queue (filled once they are built)."""
        self.interval = interval
        self.deadline = deadline
        """Seconds a poll waits for its answer (see store.statement_deadline)."""
        self.store: Store | None = None
        self.names: list[str] = []
        self.polls = 0
        """Polls done so far."""
        self.poll_done = anyio.Event()
        """Set, and replaced, at the end of each poll."""
        self._soon = anyio.Event()
        self._errors = Once()
        self._served = False
        """A poll has answered: every queue loop it did not wake is being served."""

    def poll_soon(self) -> None:
        """Poll now rather than at the next interval."""
        self._soon.set()

    async def run(self, store: Store, names: Sequence[str]) -> None:
        """Poll every interval, and when asked, until cancelled; ``names``: what the queue
        loops claim."""
        self.store, self.names = store, list(names)
        while True:
            await self.poll()  # the first at once: the queue loops wait for it to claim
            with anyio.move_on_after(self.interval):
                await self._soon.wait()
            self._soon = anyio.Event()

    async def poll(self) -> None:
        """Wake every queue loop with work due now, and set a wake-up for those with work
        due before the next poll."""
        assert self.store is not None, "run() first"
        try:
            with anyio.fail_after(self.deadline):
                due = await self.store.due_queues(list(self.workers), self.names, self.interval)
        except Exception as exc:
            if is_fatal(exc):
                raise
            error = redact(f"{type(exc).__name__}: {exc}")
            if is_transient(exc):
                log.warning("poll_failed", error=error)
            elif self._errors.new(error):
                log.error("poll_failed", error=error, note="retried every poll interval")
        else:
            self._errors.clear()
            for queue, wait in due:
                if (w := self.workers.get(queue)) is not None:
                    w.due_in(wait)
            if not self._served:
                self._served = True
                woken = {queue for queue, wait in due if wait <= 0}
                for queue, w in self.workers.items():
                    if queue not in woken:
                        w.claimed_once.set()  # those woken set it once they have claimed
        self.polls += 1
        done, self.poll_done = self.poll_done, anyio.Event()
        done.set()
