"""server._IdleTimer, the idle timer of a guarded Hypercorn connection, on a
virtual clock: it closes a connection idle for ``keep_alive_timeout``, never
one with a request in hand; at a shutdown, an idle one at once and a busy one
once answered; nothing after the connection's reading has ended; and it uses
one task for the connection's life, however many requests it serves."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import trio
import trio.testing
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.worker_context import EventWrapper

from redirect_logger.server import _IdleTimer

TIMEOUT = 5.0


class FakeServer:
    """What the timer reads of ``_GuardedTCPServer``, and when it closed."""

    def __init__(self) -> None:
        self.context = SimpleNamespace(terminated=EventWrapper())
        self.config = SimpleNamespace(keep_alive_timeout=TIMEOUT)
        self._read_ended = False
        self._closing = False
        self.closed_at: list[float] = []

    async def _initiate_server_close(self) -> None:
        self._closing = True
        self.closed_at.append(trio.current_time())


def timer_of(server: FakeServer) -> Any:
    return _IdleTimer(server)  # type: ignore[arg-type]


async def test_an_idle_connection_closes_after_the_timeout_and_a_busy_one_never(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = FakeServer()
    timer = timer_of(server)
    async with TaskGroup() as group:
        start = trio.current_time()
        await timer.restart(group, None)  # connected: idle
        for _ in range(3):  # a request every 4 s, each answered in 1 s
            await trio.sleep(4.0)
            await timer.stop()
            await trio.sleep(1.0)
            await timer.restart(group, None)
        assert server.closed_at == []
        await timer.stop()  # a request that takes 60 s
        await trio.sleep(60.0)
        assert server.closed_at == []
        await timer.restart(group, None)
        await trio.sleep(TIMEOUT + 1)
    assert server.closed_at == [start + 15.0 + 60.0 + TIMEOUT]


async def test_at_a_shutdown_an_idle_connection_closes_at_once_a_busy_one_once_answered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    idle, busy = FakeServer(), FakeServer()
    idle_timer, busy_timer = timer_of(idle), timer_of(busy)
    async with TaskGroup() as group:
        await idle_timer.restart(group, None)
        await busy_timer.restart(group, None)
        await busy_timer.stop()
        await trio.sleep(1.0)
        shutdown = trio.current_time()
        await idle.context.terminated.set()
        await busy.context.terminated.set()
        await trio.sleep(2.0)
        answered = trio.current_time()
        await busy_timer.restart(group, None)
        await trio.sleep(0.1)
    assert (idle.closed_at, busy.closed_at) == ([shutdown], [answered])


async def test_nothing_is_closed_once_the_reading_has_ended(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = FakeServer()
    timer = timer_of(server)
    async with TaskGroup() as group:  # exits: the timer's task has ended
        await timer.restart(group, None)
        await trio.sleep(1.0)
        server._read_ended = True
        await timer.stop()
        await timer.restart(group, None)  # an HTTP/2 stream ending afterwards
        await trio.sleep(TIMEOUT * 2)
    assert server.closed_at == []


async def test_one_task_serves_every_request_of_a_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = FakeServer()
    timer = timer_of(server)
    group = CountingGroup()
    async with group:
        for _ in range(100):
            await timer.restart(group, None)
            await trio.sleep(0.01)
            await timer.stop()
        server._read_ended = True
        await timer.stop()
    assert (group.spawned, server.closed_at) == (1, [])


class CountingGroup(TaskGroup):
    """Hypercorn's task group, counting the tasks spawned in it."""

    spawned = 0

    def spawn(self, func: Callable[..., Any], *args: Any) -> None:
        self.spawned += 1
        super().spawn(func, *args)
