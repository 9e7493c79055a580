"""Run `async def` tests on uvloop, each with a deadline and a check that no task leaks."""

import asyncio
import inspect
import os

import pytest
import uvloop

# Peers started by tests prove 8 bits of identity work, not the product's 20 (a second or two each, on
# every one of the suite's hundred-odd peers); tests/peer/test_closed_run.py runs the default.
os.environ.setdefault("SHOAL_IDENTITY_BITS", "8")

# A test that has not finished after this long is hung (a missed wake-up, a lost frame): fail it.
TEST_DEADLINE_S = 60.0


async def _run_checked(coro):
    await asyncio.wait_for(coro, TEST_DEADLINE_S)
    await asyncio.sleep(0)
    leaked = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not leaked, f"tasks left behind: {leaked}"


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    uvloop.run(_run_checked(pyfuncitem.obj(**kwargs)))
    return True
