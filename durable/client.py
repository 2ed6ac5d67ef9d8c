"""durable.Client: start work, wait for results, send events, cancel, retry, replay, fork."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from durable import catalog, tracing, validation
from durable.codec import dumps
from durable.errors import DurableError, PayloadError
from durable.models import CancelResult, HistoryEntry, NewTask, Progress, TaskInfo
from durable.outcomes import Outcomes
from durable.registry import Definition, registry
from durable.store import Connection, Store
from durable.validation import MAX_NAME, InvalidValue, shown
from durable.validation import debounce as _debounce
from durable.validation import idempotency_key as _key
from durable.validation import task_id as _task_id


class Handle:
    """A started task: its ``id``, and ``await handle.result()``."""

    def __init__(self, client: Client, task_id: int, created: bool = True) -> None:
        self.client = client
        self.id = task_id
        self.created = created
        """False when an idempotency key returned an existing task."""

    def __repr__(self) -> str:
        return f"Handle(id={self.id})"

    async def result(self, timeout: float | None = None) -> Any:
        """Wait for the task to finish and return its result.

        Raises ``TaskFailed`` (with the remote error type, message and traceback),
        ``TaskCancelled``, or ``TimeoutError`` after ``timeout`` seconds (0: look once, and
        return the result of a task that has finished). Woken by a notification when the
        task finishes; it re-checks now and then in case one is lost, and listens again
        when its connection was lost.
        """
        return await self.client.result(self.id, timeout=timeout)

    async def get(self) -> TaskInfo:
        return await self.client.get(self.id)

    def progress(self) -> AsyncIterator[Progress]:
        """The task's progress reports as they are written, until it finishes:
        ``async for p in handle.progress(): print(p.value, p.message)``.

        Yields the latest report first (if any), then each new one; woken by a
        notification, not by polling. Reports written while the iterator was not reading
        are coalesced into the latest one.
        """
        return self.client.progress(self.id)


class Client:
    """Talks to durable's tables; get one with ``async with durable.connect() as client``."""

    def __init__(self, store: Store, dsn: str | None, listen_dsn: str | None = None) -> None:
        self.store = store
        self.dsn = dsn
        self.listen_dsn = listen_dsn or dsn
        """Where ``result()`` LISTENs: the server itself when ``dsn`` goes through a
        transaction pooler, which cannot hold a LISTEN."""
        self.outcomes = Outcomes(store, self.listen_dsn)

    async def close(self) -> None:
        await self.outcomes.close()
        await self.store.close()

    # -- starting work ---------------------------------------------------------------

    def _new_task(
        self,
        fn: Definition[Any, Any] | str,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        *,
        queue: str | None,
        priority: int | None,
        delay: float | None,
        run_at: datetime | None,
        max_attempts: int | None,
        timeout: float | None,
        deadline: float | datetime | None = None,
    ) -> NewTask:
        d = fn if isinstance(fn, Definition) else registry.get(fn) if isinstance(fn, str) else None
        name = _text(d.name if d is not None else fn, "a task name")
        q = _text(queue if queue is not None else (d.queue if d is not None else "default"),
                  "a queue name")
        if delay is not None and run_at is not None:
            raise InvalidValue("give delay or run_at, not both")
        if delay is not None:
            if not isinstance(delay, int | float) or not 0 <= delay < 10 * 365 * 86400:
                raise InvalidValue(f"delay must be a number of seconds from 0 to 10 years, got {shown(delay)}")
            run_at = self.store.now() + timedelta(seconds=delay)
        if run_at is not None and run_at.tzinfo is None:
            raise InvalidValue("run_at must be an aware datetime (with tzinfo)")
        prio = priority if priority is not None else (d.priority if d is not None else 0)
        if not isinstance(prio, int) or not -(2**31) <= prio < 2**31:
            raise InvalidValue(f"priority must be a 32-bit whole number, got {shown(prio)}")
        attempts = max_attempts if max_attempts is not None else (d.max_attempts if d else 3)
        if not isinstance(attempts, int) or not 1 <= attempts < 2**31:
            raise InvalidValue(f"max_attempts must be a whole number from 1 to 2**31-1, got {shown(attempts)}")
        limit = timeout if timeout is not None else (d.timeout if d else None)
        if limit is not None and not (
            isinstance(limit, int | float) and limit > 0 and math.isfinite(limit)
        ):
            raise InvalidValue(f"timeout must be a positive number of seconds, got {shown(limit)}")
        overrides: dict[str, Any] = {}
        if deadline is not None:
            if isinstance(deadline, datetime):
                if deadline.tzinfo is None:
                    raise InvalidValue("deadline must be an aware datetime (with tzinfo)")
                seconds = (deadline - self.store.now()).total_seconds()
            elif isinstance(deadline, int | float) and not isinstance(deadline, bool):
                seconds = float(deadline)
            else:
                raise InvalidValue(
                    f"deadline must be seconds from now or an aware datetime, got {shown(deadline)}"
                )
            if not (math.isfinite(seconds) and abs(seconds) < 10 * 365 * 86400):
                raise InvalidValue(f"deadline must be within 10 years, got {shown(deadline)}")
            overrides["deadline"] = seconds  # a past datetime: the task fails at its claim
        return NewTask.from_definition(
            d if d is not None else Definition.elsewhere(name),
            args,
            kwargs,
            queue=q,
            priority=prio,
            run_at=run_at,
            max_attempts=attempts,
            timeout=float(limit) if limit is not None else None,
            trace_context=tracing.inject(),  # the caller's span becomes the task's parent
            **overrides,
        )

    async def start(
        self,
        fn: Definition[Any, Any] | str,
        /,
        *args: Any,
        queue: str | None = None,
        idempotency_key: str | None = None,
        priority: int | None = None,
        delay: float | None = None,
        run_at: datetime | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        conn: Connection | None = None,
        allow_unknown: bool = False,
        tags: Sequence[str] | None = None,
        attributes: Mapping[str, str | int | float | bool] | None = None,
        idempotency: str | None = None,
        deadline: float | datetime | None = None,
        debounce: float | None = None,
        debounce_key: str | None = None,
        max_delay: float | None = None,
        **kwargs: Any,
    ) -> Handle:
        """Enqueue ``fn(*args, **kwargs)``; returns a Handle at once.

        ``fn`` is a registered definition or a name. A name this process has no code for
        is resolved through the catalog the daemons publish: the task gets that
        definition's kind, queue, defaults and version, and the options given here win.
        A name no daemon ever published raises ``UnknownDefinition`` (a DurableError)
        unless ``queue`` is given or ``allow_unknown=True`` (the task then waits for a
        daemon with its code). ``delay`` (seconds) or ``run_at`` schedule it;
        ``idempotency_key`` returns the task already started with that key; ``conn``
        enqueues inside the caller's asyncpg transaction, so the task exists only if that
        transaction commits. ``tags`` (up to 20 strings) and ``attributes`` (up to 20 names
        with a string, number or boolean each) label the task for searching: ``durable ls
        transaction commits. ``tags`` (up to 20 strings) and ``attributes`` (up to 20 names
        with a string, number or boolean each) label the task for searching: ``durable ls
        --tag vip --attr region=eu`` and the dashboard's task list filter by them.
        ``idempotency="active"`` makes the key return its task only while that task is
        queued, running or waiting (the key frees once it finishes; default ``"forever"``,
        or the definition's ``idempotency=``). ``deadline`` (seconds from now, or an aware
        datetime) bounds the whole run, overriding the definition's ``deadline=``: once it
        passes the task fails with ``DeadlineExceeded`` and its unfinished children are
        cancelled.

        ``debounce=seconds`` runs the task that many seconds after the *last* start of its
        ``debounce_key`` (default: the task's name): a start while an earlier one is still
        queued replaces its arguments and options (the last start wins; an option left out
        takes the definition's default) and pushes its run time back, never past
        ``max_delay`` seconds after the first of them (a later start's ``max_delay`` may
        bring that time closer, never push it back). The handle is that queued task's.
        """
        labels = validation.labels(
            list(tags) if isinstance(tags, list | tuple) else tags,
            dict(attributes) if isinstance(attributes, Mapping) else attributes,
        )
        fn = await self._definition(fn, queue, allow_unknown, conn)
        t = self._new_task(
            fn, args, kwargs, queue=queue, priority=priority, delay=delay, run_at=run_at,
            max_attempts=max_attempts, timeout=timeout, deadline=deadline,
        )
        if idempotency_key is not None:
            _key(idempotency_key)
        bounce = None
        if debounce is not None or debounce_key is not None or max_delay is not None:
            bounce = _debounce(t.name, debounce, debounce_key, max_delay)
            if idempotency_key is not None or delay is not None or run_at is not None:
                raise InvalidValue("debounce cannot be combined with idempotency_key, delay or run_at")
        scope = _scope(fn, idempotency)
        if idempotency is not None and idempotency_key is None:
            raise InvalidValue("idempotency= needs an idempotency_key")
        if labels != (None, None):
            if bounce is not None or scope == "active":
                raise InvalidValue(
                    "tags and attributes cannot be combined with debounce or idempotency='active'"
                )
            tag_list, attrs = labels
            task_id, inserted = await self.store.tasks.insert_task_labelled(
                t, tag_list, dumps(attrs) if attrs is not None else None,
                idempotency_key=idempotency_key, conn=conn,
            )  # fmt: skip
            return Handle(self, task_id, inserted)
        task_id, inserted = await self.store.insert_task(
            t, idempotency_key=idempotency_key, conn=conn, active=scope == "active",
            debounce=bounce,
        )
        return Handle(self, task_id, inserted)

    async def start_many(
        self,
        fn: Definition[Any, Any] | str,
        calls: Sequence[Sequence[Any] | tuple[Sequence[Any], dict[str, Any]]],
        *,
        queue: str | None = None,
        priority: int | None = None,
        delay: float | None = None,
        conn: Connection | None = None,
        allow_unknown: bool = False,
    ) -> list[Handle]:
        """Enqueue many calls of ``fn`` in one statement (past 4 MB of arguments, in several
        statements of one transaction: all or none of them).

        ``calls`` holds one argument list per task, or ``(args, kwargs)`` pairs. A name is
        resolved as by ``start``.
        """
        fn = await self._definition(fn, queue, allow_unknown, conn)
        pairs = [
            (call[0], call[1])
            if isinstance(call, tuple) and len(call) == 2 and isinstance(call[1], dict)
            else (call, {})
            for call in calls
        ]
        if not pairs:
            return []
        d = fn if isinstance(fn, Definition) else registry.get(fn)
        if d is not None and d.concurrency_key is not None:
            # Each call has its own key and per-key limits: a row of its own each.
            tasks = []
            for i, (args, kw) in enumerate(pairs):
                with _call_index(i, len(pairs)):
                    tasks.append(self._new_task(
                        fn, list(args), kw, queue=queue, priority=priority, delay=delay,
                        run_at=None, max_attempts=None, timeout=None,
                    ))  # fmt: skip
            ids = await self.store.insert_many(tasks, conn=conn)
        else:
            # The usual case: the tasks differ only in their arguments. The options are
            # checked once, and only the arguments travel as arrays.
            with _call_index(0, len(pairs)):
                first = self._new_task(
                    fn, list(pairs[0][0]), pairs[0][1], queue=queue, priority=priority,
                    delay=delay, run_at=None, max_attempts=None, timeout=None,
                )
            what = f"the arguments of {first.name!r}"
            args = [first.args]
            keywords = any(kw for _, kw in pairs)
            kwargs: list[str] | None = [first.kwargs] if keywords else None
            try:
                for i in range(1, len(pairs)):
                    a, kw = pairs[i]
                    args.append(dumps(list(a), what=what))
                    if kwargs is not None:
                        kwargs.append(dumps(kw, what=what))
            except PayloadError as exc:
                raise _at_call(exc, i, len(pairs)) from None
            ids = await self.store.insert_uniform(first, args, kwargs, conn=conn)
        return [Handle(self, i) for i in ids]

    async def _definition(
        self,
        fn: Definition[Any, Any] | str,
        queue: str | None,
        allow_unknown: bool,
        conn: Connection | None,
    ) -> Definition[Any, Any] | str:
        """``fn``'s definition: its own, the registry's, else the catalog's."""
        if not isinstance(fn, str):
            return fn
        local = registry.get(fn)
        if local is not None:
            return local
        name = _text(fn, "a task name")
        entry = await self.store.resolve_definition(name, conn)
        if entry is not None:
            return entry.definition()
        if queue is None and not allow_unknown:
            raise catalog.unknown(name, "pass queue=... or allow_unknown=True")
        return name

    # -- reading ------------------------------------------------------------------------

    async def get(self, task_id: int) -> TaskInfo:
        """The task's current state; raises DurableError if there is no such task."""
        info = await self.store.get_task(_task_id(task_id))
        if info is None:
            raise DurableError(f"no task {task_id}")
        return info

    async def history(self, task_id: int, branch: int | None = None) -> list[HistoryEntry]:
        """The workflow's event log on ``branch`` (default: its current branch)."""
        if branch is None:
            branch = (await self.get(task_id)).branch
        return await self.store.history(task_id, branch)

    async def chain(self, task_id: int) -> tuple[int | None, int | None]:
        """The run this workflow run continues and the run that continued it
        (``ctx.continue_as_new``), each None when there is none."""
        return await self.store.chain(_task_id(task_id))

    async def branches(self, task_id: int) -> list[int]:
        return await self.store.branches(_task_id(task_id))

    async def result(self, task_id: int, timeout: float | None = None) -> Any:
        """See :meth:`Handle.result`."""
        return await self.outcomes.result(task_id, timeout)

    def progress(self, task_id: int) -> AsyncIterator[Progress]:
        """See :meth:`Handle.progress`."""
        return self.outcomes.progress(task_id)

    # -- acting on tasks ------------------------------------------------------------------

    async def cancel(self, task_id: int) -> CancelResult:
        """Cancel the task and its unfinished descendants; says which tasks it cancelled,
        or the task's status when it had already finished.

        Queued and waiting tasks end at once; a running one is interrupted by its daemon
        (told at once, or at its next heartbeat when the notification is lost) and ends
        ``cancelled`` whatever its attempt does next: a cancel that commits before the
        outcome wins.
        """
        task_id = _task_id(task_id)
        rows = await self.store.cancel([task_id])
        finished = next((status for i, status, done in rows if i == task_id and done), None)
        cancelled = [i for i, _, done in rows if not done]
        cancelled.sort(key=lambda i: i != task_id)  # the task itself first
        return CancelResult(task_id, tuple(cancelled), finished)

    async def send_event(
        self,
        task_id: int,
        name: str,
        payload: Any = None,
        *,
        idempotency_key: str | None = None,
    ) -> bool:
        """Deliver event ``name`` to the workflow; kept until it waits for it.

        Returns False when the task has finished or does not exist. With an
        ``idempotency_key``, sending again with the same key to the same task (a producer
        retrying after a lost reply, or two producers racing) delivers nothing more and
        returns True, even once the task has finished.
        """
        _text(name, "an event name")
        if idempotency_key is not None:
            _key(idempotency_key)
        return await self.store.send_event(
            _task_id(task_id), name, dumps(payload, what="the event payload"), idempotency_key
        )

    async def retry(self, task_id: int) -> int:
        """Run a finished task again keeping its history: finished steps are not re-run."""
        return await self.store.restart(_task_id(task_id), "retry")

    async def replay(self, task_id: int) -> int:
        """Run a finished workflow again from nothing on a new branch; returns the branch."""
        return await self.store.restart(_task_id(task_id), "replay")

    async def fork(self, task_id: int, at: int) -> int:
        """A new branch keeping events 0..at-1; the workflow re-runs from position ``at``
        (0 to the length of its log)."""
        position = validation.whole(at, "fork: at", 0, 2**31 - 1)  # an integer column
        return await self.store.restart(_task_id(task_id), "fork", position)


@contextmanager
def _call_index(i: int, n: int) -> Iterator[None]:
    """A PayloadError raised within names the call of start_many it is about."""
    try:
        yield
    except PayloadError as exc:
        raise _at_call(exc, i, n) from None


def _at_call(exc: PayloadError, i: int, n: int) -> PayloadError:
    return PayloadError(f"call {i} (of {n}, counted from 0): {exc}")


def _text(value: object, what: str, limit: int | None = MAX_NAME) -> str:
    """``value`` if it is text Postgres can store (no NUL, no lone surrogate) of 1 to
    ``limit`` characters; else an InvalidValue naming ``what``."""
    return validation.text(value, what, limit=limit)


SCOPES = ("forever", "active")
"""Idempotency scopes: a key returns its task ever, or only while that task is unfinished."""


def _scope(fn: object, given: object) -> str:
    if given is None:
        d = fn if isinstance(fn, Definition) else registry.get(fn) if isinstance(fn, str) else None
        return d.idempotency if d is not None else "forever"
    if given not in SCOPES:
        raise InvalidValue(f"idempotency must be 'forever' or 'active', got {shown(given)}")
    return str(given)
