"""``Env``: a client and an in-process worker on one test database, a clock the test moves,
and faults it injects."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Self

import anyio

from durable.client import Client, Handle
from durable.daemon import Daemon
from durable.errors import DurableError
from durable.models import Claimed, IdleState
from durable.registry import Definition, Registry
from durable.registry import registry as defined
from durable.settings import Settings
from durable.store import Store

__all__ = ["Env", "InjectedFault"]


class InjectedFault(Exception):
    """The error ``env.fail_once`` makes a step, transaction or task raise."""


@dataclass
class _Fault:
    name: str
    times: int
    error: BaseException | None


class _Hooks:
    """The seams (durable.hooks) the test worker runs with."""

    def __init__(self, env: Env) -> None:
        self.env = env

    def shift(self) -> timedelta:
        return self.env._shift

    async def before_call(self, task: Claimed, kind: str, name: str) -> None:
        env = self.env
        if (name, "before") in env._kills:
            env._kills.discard((name, "before"))
            await env._die(f"kill_at({name!r})")
        for fault in env._faults:
            if fault.name == name and fault.times > 0:
                fault.times -= 1
                raise fault.error or InjectedFault(f"injected by fail_once({name!r})")

    async def after_call(self, task: Claimed, kind: str, name: str) -> None:
        env = self.env
        if (name, "after") in env._kills:
            env._kills.discard((name, "after"))
            await env._die(f"kill_at({name!r}, after=True)")

    async def backoff(self, seconds: float) -> None:
        # Time-skipping: the tries run back to back. The clock does not move for it (that
        # would move every other task's timers too); the test reads env.backoffs.
        self.env.backoffs.append(seconds)


class Env:
    """A client and a worker on one database, for a test (the ``durable_env`` fixture).

    ::

        async with Env(dsn) as env:
            handle = await env.start(fulfill, "order-17")
            await env.run_until_idle()
            await env.advance(hours=24)
            await env.run_until_idle()

    The worker is a daemon running in this event loop, serving ``queues`` (default: the
    queue of every definition in ``registry``, and ``default``) with the code of
    ``registry`` (default: every task and workflow defined with the decorators).
    ``settings`` are options as ``durable.serve`` takes them (``lease="10s"``...); the
    process's ``DURABLE_*`` variables are not read.
    """

    def __init__(
        self,
        dsn: str,
        *,
        registry: Registry | None = None,
        queues: Sequence[str] | None = None,
        **settings: object,
    ) -> None:
        self.dsn = dsn
        self.registry = registry if registry is not None else defined
        served = [d.queue for d in self.registry.definitions()] if queues is None else queues
        self.queues: list[str] = list(dict.fromkeys([*served, *([] if queues else ["default"])]))
        if not self.queues:
            raise ValueError("Env: queues must name at least one queue")
        options: dict[str, object] = {
            "poll_interval": "1", "lease": "30", "shutdown_grace": "2", **settings,
            "queues": ",".join(self.queues),
        }
        self.settings = Settings.from_env({}, **options)
        self._client: Client | None = None
        self._shift = timedelta()
        self._faults: list[_Fault] = []
        self._kills: set[tuple[str, str]] = set()
        self._hooks = _Hooks(self)
        self._daemon: Daemon | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None
        self._killed: str | None = None
        self._dead_workers: list[Any] = []
        self.backoffs: list[float] = []
        """The seconds of each step backoff taken inside a run, in order: the test kit
        skips them (a longer backoff is a durable sleep, which ``advance`` passes)."""

    # -- lifetime ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        store = await Store.open(self.dsn, max_size=4, name="durable-test-client",
                                 kept_enqueue=True)
        self._client = _MovedClient(store, self.dsn, self)
        try:
            await self._start_worker()
        except BaseException:
            await self._client.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self._stop_worker()
        finally:
            if self._client is not None:
                with anyio.CancelScope(shield=True):
                    await self._client.close()

    @property
    def client(self) -> Client:
        """A ``durable.Client`` on the test database."""
        if self._client is None:
            raise DurableError("the test environment is not open (use `async with Env(...)`)")
        return self._client

    @property
    def worker(self) -> Daemon:
        """The in-process daemon serving now (a new one after each ``resume``)."""
        if self._daemon is None:
            raise DurableError("the test environment is not open (use `async with Env(...)`)")
        return self._daemon

    @property
    def killed(self) -> bool:
        """The worker was killed and has not been resumed."""
        return self._killed is not None

    async def _start_worker(self) -> None:
        # The scheduler's clock is the moved one: schedules are not moved with the data.
        daemon = Daemon(self.settings, self.registry, self.dsn, pool_size=4,
                        clock=self.now, hooks=self._hooks)
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        stop = asyncio.Event()

        async def serve() -> None:
            try:
                async with anyio.create_task_group() as tg:
                    await tg.start(daemon.run)
                    started.set_result(None)
                    await stop.wait()
                    daemon.stop()
            except BaseException as exc:
                if not started.done():
                    started.set_exception(exc if isinstance(exc, Exception) else DurableError(
                        "the test worker stopped while starting"))
                raise

        killed = self._killed
        self._daemon, self._stop, self._killed = daemon, stop, None
        self._task = task = asyncio.create_task(serve(), name="durable-test-worker")
        try:
            await started
        except BaseException:
            # Whoever started it is gone (cancelled, say): stop the worker now. Left to
            # start, it would run with no one to stop it, and then find `started` cancelled.
            self._task, self._killed = None, killed
            task.cancel()
            with anyio.CancelScope(shield=True), contextlib.suppress(BaseException):
                await task
            raise

    async def _stop_worker(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        if self._stop is not None:
            self._stop.set()
        with anyio.CancelScope(shield=True):
            if self._killed is not None:
                with contextlib.suppress(BaseException):
                    await task
            else:
                await task

    # -- work -------------------------------------------------------------------------

    async def start(self, fn: Definition[Any, Any] | str, /, *args: Any, **kwargs: Any) -> Handle:
        """``client.start(...)``; a name is looked up in the Env's registry first, and
        ``run_at`` is on the moved clock."""
        if isinstance(fn, str):
            fn = self.registry.get(fn) or fn
        return await self.client.start(fn, *args, **kwargs)

    async def send_event(self, task: Handle | int, name: str, payload: Any = None) -> bool:
        """``client.send_event``; takes a handle or a task id."""
        return await self.client.send_event(_id(task), name, payload)

    async def result(self, task: Handle | int) -> Any:
        """The finished task's result (or its error raised); fails at once, rather than
        waiting, if it has not finished: call ``run_until_idle`` first."""
        return await self.client.result(_id(task), timeout=0.5)

    async def run_until_idle(self, *, timeout: float = 60.0) -> None:
        """Run the worker until it is idle, or killed by ``kill_at``.

        Idle means: no task is running (anywhere), none is queued and due, no waiting
        workflow's timer is due, no cron tick is due on the moved clock, and the worker has
        nothing left to write. Workflows waiting for an event, for children or for a timer
        still in the future do not count: moving the clock (``advance``) or sending the
        event makes them work again. A due task that the worker cannot run (its queue is
        not served, or its name not registered) raises at once rather than waiting for
        ever; ``TimeoutError`` after ``timeout`` seconds names what is still busy.
        """
        state: IdleState | None = None
        try:
            with anyio.fail_after(timeout):
                while True:
                    daemon = self._alive()
                    if daemon is None:
                        return  # killed by kill_at while it ran: the test resumes it
                    try:
                        state = await self._state(daemon)
                    except Exception:
                        if self._killed is not None:
                            return  # killed while this looked (its connections closed)
                        raise
                    if state is None:
                        return
                    await anyio.sleep(0.005)
        except TimeoutError:
            raise TimeoutError(
                f"run_until_idle: still busy after {timeout}s: {_describe(state)}"
            ) from None

    async def _state(self, daemon: Daemon) -> IdleState | None:
        """None when idle; otherwise what is busy, after poking what can move."""
        store, housekeeping = daemon.store, daemon.housekeeping
        if store is None or housekeeping is None:
            return IdleState(0, 0, 0, (), ())
        await daemon.run_schedules()  # due ticks on the moved clock start their tasks
        state = await self.client.store.idle_state(
            self.queues, self.registry.names(), daemon.id
        )
        if state.unserved:
            raise DurableError(
                f"run_until_idle: task(s) {list(state.unserved)} are due but the test worker "
                f"cannot run them: it serves the queues {self.queues} with the code of "
                f"{sorted(self.registry.names())} (pass queues= or registry= to the Env)"
            )
        busy = bool(daemon.attempts) or bool(daemon.acks is not None and daemon.acks.pending())
        if state.idle and not busy:
            return None
        if state.timers:
            housekeeping.wake_timers()
        if state.ready:
            for w in daemon.workers.values():
                w.notify()
        return state

    def _alive(self) -> Daemon | None:
        if self._killed is not None:
            return None
        task = self._task
        if task is None or self._daemon is None:
            raise DurableError("the test environment is not open (use `async with Env(...)`)")
        if task.done():
            error = task.exception() if not task.cancelled() else None
            raise DurableError(f"the test worker stopped: {error!r}") from error
        return self._daemon

    # -- the clock --------------------------------------------------------------------

    def now(self) -> datetime:
        """The moved clock: the database's time plus every ``advance`` so far (what
        ``ctx.now()`` returns in a workflow)."""
        return self.client.store.now() + self._shift

    async def advance(
        self,
        by: timedelta | None = None,
        *,
        days: float = 0,
        hours: float = 0,
        minutes: float = 0,
        seconds: float = 0,
        timeout: float = 60.0,
    ) -> None:
        """Move the clock forward, running what comes due on the way, in order.

        Every sleep, event timeout, delayed start, retry backoff and deadline stored ends
        that much sooner; cron ticks and ``ctx.now()`` see the time that much later. The
        clock stops at each time something comes due within the span and the worker runs
        until idle there (a sleep then an event's timeout both pass in one ``advance``
        of their sum), so on return everything due by the new time has run.

        The database keeps its own time: the test kit moves the stored times that are
        still ahead of it instead, found in the catalog (every timestamptz column of the
        durable schema but the leases) and moved in one transaction per stop. A workflow
        that writes a timer while the clock moves may write it on either side of the
        move: advance once ``run_until_idle`` has returned.
        """
        left = (by or timedelta()) + timedelta(
            days=days, hours=hours, minutes=minutes, seconds=seconds
        )
        if left < timedelta():
            raise ValueError(f"advance: the clock only moves forward, got {left}")
        with anyio.fail_after(timeout):
            while left > timedelta():
                step = await self._next_due()
                if step is None or step > left:
                    await self._move(left)
                    return
                await self._move(step)
                left -= step
                await self.run_until_idle(timeout=timeout)

    async def _next_due(self) -> timedelta | None:
        """How far the clock must move for the next stored time (or cron tick) to come
        due; None with nothing ahead, or no worker to run it."""
        daemon = self._daemon
        if daemon is None or self._killed is not None or daemon.housekeeping is None:
            return None
        steps = [await self.client.store.next_time()]
        tick = await daemon.run_schedules()
        if tick is not None:
            steps.append(tick - self.now())
        ahead = [max(s, timedelta(microseconds=1)) for s in steps if s is not None]
        return min(ahead) if ahead else None

    async def _move(self, step: timedelta) -> None:
        if step <= timedelta():
            return
        await self.client.store.shift_times(step)
        self._shift += step
        daemon = self._daemon
        if daemon is not None and daemon.housekeeping is not None and self._killed is None:
            daemon.housekeeping.wake_timers()

    # -- faults -----------------------------------------------------------------------

    def fail_once(self, name: str, *, times: int = 1, error: BaseException | None = None) -> None:
        """Make the next ``times`` calls named ``name`` fail, before their code runs: a
        step's or transaction's (by step name) or a task's or workflow's (by its name).
        They raise ``error`` (default ``InjectedFault``), recorded as the code's own."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"fail_once: name must be a step, task or workflow name, got {name!r}")
        if not isinstance(times, int) or times < 1:
            raise ValueError(f"fail_once: times must be a whole number >= 1, got {times!r}")
        self._faults.append(_Fault(name, times, error))

    def kill_at(self, step: str, *, after: bool = False) -> None:
        """Kill the worker when a workflow reaches the step (or transaction) ``step``:
        before its code runs, or with ``after=True`` once it has run but before its
        checkpoint is written (so a resumed workflow runs it again). Once."""
        if not isinstance(step, str) or not step:
            raise ValueError(f"kill_at: step must be a step name, got {step!r}")
        self._kills.add((step, "after" if after else "before"))

    async def kill(self) -> None:
        """Kill the worker now, as ``kill -9`` kills a daemon: its connections close at
        once, so nothing it had not committed is written, and its tasks stay claimed
        (status running) until ``resume``."""
        if self._killed is None:
            self._kill_now("env.kill()")
        await self._stop_worker()

    async def resume(self) -> None:
        """Start a new worker after a kill. The dead worker's leases are run out at once
        (rather than after DURABLE_LEASE) and its tasks requeued by the reaper, each lost
        attempt counting as an attempt, as a restarted fleet would find them."""
        if self._killed is None:
            raise DurableError("resume: the worker is alive (kill it first)")
        dead = self._daemon
        await self._stop_worker()
        if dead is not None:
            store = self.client.store
            await store.expire_leases(dead.id)
            await store.reap_expired()
        await self._start_worker()

    async def _die(self, why: str) -> None:
        """Called inside the worker, at a kill point: never returns."""
        self._kill_now(why)
        await anyio.sleep_forever()

    def _kill_now(self, why: str) -> None:
        self._killed = why
        daemon = self._daemon
        if daemon is not None and daemon.store is not None:
            # First: from here on nothing of the worker reaches the database.
            daemon.store.terminate()
        if self._task is not None:
            self._task.cancel()


class _MovedClient(Client):
    """A Client whose ``run_at`` and ``deadline`` (as datetimes) are on the test's moved
    clock."""

    def __init__(self, store: Store, dsn: str | None, env: Env) -> None:
        super().__init__(store, dsn)
        self._env = env

    async def start(self, fn: Definition[Any, Any] | str, /, *args: Any,
                    run_at: datetime | None = None, **kwargs: Any) -> Handle:
        if isinstance(run_at, datetime) and run_at.tzinfo is not None:
            run_at = run_at - self._env._shift
        deadline = kwargs.get("deadline")
        if isinstance(deadline, datetime) and deadline.tzinfo is not None:
            kwargs["deadline"] = deadline - self._env._shift
        return await super().start(fn, *args, run_at=run_at, **kwargs)


def _id(task: Handle | int) -> int:
    return task.id if isinstance(task, Handle) else task


def _describe(state: IdleState | None) -> str:
    if state is None:
        return "nothing measured yet"
    parts = [f"{state.running} running", f"{state.ready} queued and due",
             f"{state.timers} due timers"]
    if state.elsewhere:
        parts.append(f"tasks {list(state.elsewhere)} held by another worker")
    return ", ".join(parts)
