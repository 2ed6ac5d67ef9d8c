"""A task and a workflow, registered when a daemon imports this module (entry point `durable`).

Try it against the compose stack:

    docker compose exec durable durable start welcome '["Ada"]' --wait
"""

from __future__ import annotations

import durable


@durable.task(queue="default", max_attempts=5, timeout=30)
async def greet(name: str) -> str:
    """Pretend to send a greeting; a real task would call an API with an idempotency key."""
    return f"Hello, {name}!"


@durable.workflow(queue="default")
async def welcome(ctx: durable.Context, name: str) -> dict[str, str]:
    """Record when the user joined, then greet them in a child task."""
    joined = await ctx.now()
    greeting = await ctx.run(greet, name)
    return {"name": name, "joined": joined.isoformat(), "greeting": greeting}
