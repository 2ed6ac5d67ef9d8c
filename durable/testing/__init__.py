"""durable.testing: test your own tasks and workflows with pytest.

Enable it with one line in your root ``conftest.py``::

    pytest_plugins = ["durable.testing"]

and take the ``durable_env`` fixture: a fresh database, a client and an in-process worker,
``await env.run_until_idle()``, a clock you move (``await env.advance(hours=2)``),
``env.fail_once(step)``, ``env.kill_at(step)`` / ``env.kill()`` and ``env.resume()``.
``verify_history(fn, history)`` checks a recorded history (``durable show ID --json``)
against the code as it is now (docs/versioning.md). See docs/testing-your-workflows.md.
"""

from durable.testing.env import Env, InjectedFault
from durable.testing.plugin import durable_dsn, durable_env, durable_server, durable_template
from durable.testing.server import TestServer
from durable.verify import HistoryMismatch, verify_history

__all__ = [
    "Env",
    "HistoryMismatch",
    "InjectedFault",
    "TestServer",
    "durable_dsn",
    "durable_env",
    "durable_server",
    "durable_template",
    "verify_history",
]
