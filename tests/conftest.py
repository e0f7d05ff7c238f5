from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest


@pytest.fixture(autouse=True)
async def no_tasks_left_running() -> AsyncIterator[None]:
    """A test that leaves tasks running has leaked a rollout loop or a server."""
    before = asyncio.all_tasks()
    yield
    left: list[asyncio.Task[object]] = []
    for _ in range(100):  # closing connections finish within a short linger
        left = [t for t in asyncio.all_tasks() - before
                if not t.done() and t is not asyncio.current_task()]
        if not left:
            break
        await asyncio.sleep(0.02)
    assert not left, f"tasks left running: {left}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # type: ignore[no-untyped-def]
    """Print the counts the crash loop gathered (guarantee 1 in docs/guarantees.md)."""
    from tests import test_crash

    if test_crash.REPORT:
        terminalreporter.write_line(f"crash loop report: {test_crash.REPORT}")
