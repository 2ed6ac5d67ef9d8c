"""``durable.serve``: a daemon running inside an application's own event loop."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskStatus

from durable.errors import ConfigurationError
from durable.logs import get_logger
from durable.registry import Registry
from durable.settings import Settings
from durable.store import check_schema, latest_version

if TYPE_CHECKING:
    from durable.daemon import Daemon

log = get_logger("durable.service")


class Service:
    """The handle ``durable.serve`` yields: the running daemon, and ways to wait on it."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._ended = anyio.Event()

    @property
    def settings(self) -> Settings:
        return self.daemon.settings

    def stop(self) -> None:
        """Begin a graceful shutdown (a second call skips the grace period)."""
        self.daemon.stop()

    async def wait(self) -> None:
        """Wait until the daemon has stopped: after ``stop()``, or, with ``burst=True``,
        once no work is ready and nothing is running."""
        await self._ended.wait()

    async def ready(self) -> None:
        """Wait until LISTEN is live and every queue has been claimed from once."""
        await self.daemon.ready.wait()

    async def idle(self, *, interval: float = 0.02) -> None:
        """Wait until this daemon holds no task and none of its queues has ready work
        (others may still be running tasks of its queues)."""
        # Polled: tasks become ready by time (retries, timers) as well as by writes.
        while not await self._idle():
            with anyio.move_on_after(interval):
                await self._ended.wait()
            if self._ended.is_set():
                return

    async def _idle(self) -> bool:
        d = self.daemon
        if d.attempts or d.store is None or (d.acks is not None and d.acks.pending()):
            return False
        # One statement for every queue (a look per queue was 500 statements per check for
        # a daemon of 500 queues).
        due = await d.store.due_queues(list(d.workers), d.registry.names(), 0.0)
        return not any(wait <= 0 for _, wait in due)

    async def _run(self, handle_signals: bool, *, task_status: TaskStatus[None]) -> None:
        try:
            await self.daemon.run(handle_signals=handle_signals, task_status=task_status)
        finally:
            self._ended.set()
        if not self.daemon.started.is_set():
            # Stopped (by a signal) before it ever served: the block still runs, and finds
            # the daemon ended.
            task_status.started()


@asynccontextmanager
async def serve(
    database_url: str | None = None,
    *,
    queues: str | Mapping[str, int] | Sequence[str] | None = None,
    registry: Registry | None = None,
    env: Mapping[str, str] | None = None,
    burst: bool = False,
    handle_signals: bool = False,
    pool_size: int = 10,
    settings: Settings | None = None,
    **overrides: object,
) -> AsyncIterator[Service]:
    """Run a daemon in this event loop for the duration of the ``async with`` block.

    ::

        async with durable.serve("postgresql://...", queues={"email": 8}) as service:
            ...  # tasks of the queue "email" run here meanwhile

    Settings are read as ``durable run`` reads them, from the ``DURABLE_*`` variables of
    ``env`` (default ``os.environ``; pass ``{}`` to ignore the environment), and keyword
    ``overrides`` win over them (``lease="10s"``, ``shutdown_grace=5``, ``http=":9090"``:
    any field of ``durable.settings.Settings``, in the form its variable takes).
    ``queues`` is ``"orders=8,email"``, a mapping of name to concurrency, or a list of
    names. The tasks served are those of ``registry`` (by default, every task and
    workflow defined with the decorators). The database is ``database_url``, else the
    settings' URL, else libpq's variables; ``durable.serve`` never starts the embedded
    Postgres. The schema must be migrated (``durable migrate``). A ``settings`` object
    built beforehand (``Settings.from_env(...)``) is used as it is, instead of ``env``,
    ``queues`` and ``overrides``.

    The block starts once the daemon serves (LISTEN live); ``await service.ready()``
    waits until its first poll has looked at every queue, and claimed from those with
    work. On
    leaving it the daemon stops gracefully: running tasks get ``shutdown_grace`` seconds.
    ``burst=True`` serves until no work is ready and nothing runs (``await
    service.wait()``). ``handle_signals=True`` stops on SIGTERM and SIGINT; leave it off
    when the application handles signals itself.
    """
    if settings is None:
        if queues is not None:
            overrides["queues"] = _queues(queues)
        settings = Settings.from_env(env, **overrides)
    elif queues is not None or env is not None or overrides:
        raise TypeError("durable.serve: pass settings, or env, queues and overrides; not both")
    url = database_url if database_url is not None else settings.database_url
    if url is None and not settings.use_libpq_env:
        raise ConfigurationError(
            "durable.serve: no database URL (pass one, or set DURABLE_DATABASE_URL)"
        )
    # Before the daemon opens its pool (whose warm-up would trip over what an older schema
    # lacks) and registers: a schema the code cannot serve is said in one line.
    version = await check_schema(url)
    async with serving(url, settings, registry, version, burst=burst,
                       handle_signals=handle_signals, pool_size=pool_size) as service:
        yield service


@asynccontextmanager
async def serving(
    url: str | None,
    settings: Settings,
    registry: Registry | None,
    version: int | None,
    *,
    burst: bool = False,
    handle_signals: bool = False,
    pool_size: int = 10,
) -> AsyncIterator[Service]:
    """``serve`` once the schema's ``version`` was read and found servable (schema_problem):
    for ``durable run``, which reads it with its own connection errors."""
    from durable.daemon import Daemon
    from durable.registry import registry as defined

    if version is not None and version > latest_version():
        log.warning("schema_newer_than_code", schema=version, code=latest_version(),
                    note="served: a release's migrations keep the previous release working")
    daemon = Daemon(
        settings, registry if registry is not None else defined, url,
        listen_dsn=settings.listen_url, burst=burst, pool_size=pool_size,
    )
    service = Service(daemon)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(service._run, handle_signals)
            try:
                yield service
            finally:
                daemon.stop()
    except BaseExceptionGroup as group:
        # One failure (the daemon's, or the block's own) is raised as itself, so that a
        # caller sees "port already in use", not "unhandled errors in a TaskGroup".
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def _queues(queues: str | Mapping[str, int] | Sequence[str]) -> str:
    if isinstance(queues, str):
        return queues
    if isinstance(queues, Mapping):
        return ",".join(f"{name}={limit}" for name, limit in queues.items())
    return ",".join(queues)
