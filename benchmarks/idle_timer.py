"""A connection's idle timer: Hypercorn 0.18's and the service's, side by side
in one process.

    python benchmarks/idle_timer.py [--rounds 21] [--requests 5000]

Hypercorn calls its connection's ``idle_task`` twice a request: ``stop`` when
a request begins, ``restart`` when its answer has gone and the connection is
idle again. Hypercorn's ``TrioSingleTask`` starts a task at each
``restart`` (``nursery.start``, under a lock) and cancels it at the next
``stop``; the service's ``server._IdleTimer`` keeps one task for the
connection's life and moves its deadline. Each round runs ``--requests``
such cycles on one connection for each side, the sides alternating, with a
checkpoint after each call as a request's own steps would yield. A figure is
the process CPU time per cycle (a request's worth) of the median round and
of the best; the ratio is the service's over Hypercorn's. "control" is a
second run of Hypercorn's, whose ratio to it is what noise alone makes.
Bounded: --rounds x --requests cycles a side.
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace
from typing import Any

import trio
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.worker_context import EventWrapper, TrioSingleTask

from redirect_logger.server import _IdleTimer


async def _cycles(timer: Any, group: TaskGroup, action: Any, requests: int) -> float:
    """CPU seconds for ``requests`` stop/restart cycles of ``timer``."""
    checkpoint = trio.lowlevel.checkpoint
    started = time.process_time()
    for _ in range(requests):
        await timer.stop()
        await checkpoint()
        await timer.restart(group, action)
        await checkpoint()
    return time.process_time() - started


async def main(rounds: int, requests: int) -> dict[str, list[float]]:
    terminated = EventWrapper()
    server = SimpleNamespace(
        context=SimpleNamespace(terminated=terminated),
        config=SimpleNamespace(keep_alive_timeout=3600.0),
        _read_ended=False,
        _closing=False,
    )

    async def hypercorn_action() -> None:  # Hypercorn's _idle_timeout, but its close
        with trio.move_on_after(3600.0):
            await terminated.wait()

    results: dict[str, list[float]] = {"hypercorn": [], "control": [], "service": []}
    async with TaskGroup() as group:
        hypercorn: Any = TrioSingleTask()
        control: Any = TrioSingleTask()
        service: Any = _IdleTimer(server)  # type: ignore[arg-type]
        for timer in (hypercorn, control, service):
            await timer.restart(group, hypercorn_action)
        for round_ in range(rounds):
            sides: list[tuple[str, Any]] = [
                ("hypercorn", hypercorn),
                ("service", service),
                ("control", control),
            ]
            if round_ % 2:
                sides.reverse()
            for name, timer in sides:
                seconds = await _cycles(timer, group, hypercorn_action, requests)
                results[name].append(seconds / requests)
        server._read_ended = True
        for timer in (hypercorn, control, service):
            await timer.stop()
    return results


def report(results: dict[str, list[float]]) -> None:
    base = statistics.median(results["hypercorn"])
    print("| timer | median us a request | best us a request | ratio to Hypercorn's (median) |")
    print("| --- | ---: | ---: | ---: |")
    for name in ("hypercorn", "control", "service"):
        figures = results[name]
        median = statistics.median(figures)
        print(f"| {name} | {median * 1e6:.1f} | {min(figures) * 1e6:.1f} | {median / base:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()
    report(trio.run(main, args.rounds, args.requests))
