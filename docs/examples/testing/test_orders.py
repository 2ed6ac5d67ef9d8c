import pytest
from orders import charges, fulfill

from durable.testing import Env

pytestmark = pytest.mark.asyncio


@pytest.fixture(autouse=True)
def no_charges() -> None:
    charges.clear()


async def test_approved_within_the_day(durable_env: Env) -> None:
    env = durable_env
    handle = await env.start(fulfill, "o-17")
    await env.run_until_idle()  # charged, then asleep for a day
    assert (await handle.get()).status == "waiting"

    await env.advance(days=1)
    await env.run_until_idle()  # awake, waiting for the approval
    await env.send_event(handle, "approved", {"by": "ops"})
    await env.run_until_idle()

    assert await env.result(handle) == {"by": "ops", "receipt": "receipt-o-17", "status": "shipped"}


async def test_expires_without_approval(durable_env: Env) -> None:
    env = durable_env
    handle = await env.start(fulfill, "o-18")
    await env.run_until_idle()
    await env.advance(days=1, hours=6)  # the sleep and the event's timeout
    await env.run_until_idle()
    assert (await env.result(handle))["status"] == "expired"


async def test_a_failing_charge_is_retried(durable_env: Env) -> None:
    env = durable_env
    env.fail_once("charge")  # its first try raises durable.testing.InjectedFault
    handle = await env.start(fulfill, "o-19")
    await env.run_until_idle()
    assert (await handle.get()).attempt == 2  # the workflow's retry, due after a backoff

    await env.advance(seconds=5)
    await env.run_until_idle()
    assert charges == ["o-19"]  # the injected failure came before the code ran


async def test_a_crash_after_charging(durable_env: Env) -> None:
    env = durable_env
    env.kill_at("charge", after=True)  # the worker dies before the charge is recorded
    handle = await env.start(fulfill, "o-20")
    await env.run_until_idle()
    assert env.killed

    await env.resume()  # a new worker takes the workflow over
    await env.run_until_idle()
    assert charges == ["o-20", "o-20"]  # steps run at least once: use idempotency keys
    assert (await handle.get()).attempt == 2
