"""The diagnostics of issue 12: the step tracer, and the collector settled while serving."""

from __future__ import annotations

import gc
import re
import time
from pathlib import Path

import httpx
import trio

from brokers import Broker
from redirect_logger.heap import YOUNG_THRESHOLD, settled
from redirect_logger.steps import BOUNDS, StepTrace
from support import ServiceProcess, check_delivery, service_config, unique_topic, write_config


def test_the_longest_step_is_found_with_its_task_and_place() -> None:
    """A task that holds the loop 30 ms is at the top, named, and where it stopped."""

    async def hog() -> None:
        await trio.lowlevel.checkpoint()
        began = time.perf_counter()
        while time.perf_counter() - began < 0.03:
            pass
        await trio.lowlevel.checkpoint()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(trio.sleep, 0)
            nursery.start_soon(hog, name="the-hog")

    trace = StepTrace(keep=3)
    trio.run(main, instruments=[trace])
    longest = max(trace.longest_steps)
    assert longest.task == "the-hog"
    assert longest.seconds >= 0.03
    assert "hog (test_steps:" in longest.where
    assert len(trace.longest_steps) == 3
    assert sum(trace.histogram) == trace.steps
    assert trace.histogram[BOUNDS.index(0.1)] >= 1  # 30 ms: in (20 ms, 100 ms]
    assert trace.passes >= 1
    report = trace.report()
    assert report.splitlines()[0].startswith(f"trio steps: {trace.steps:,}")
    assert re.search(r"^\s+\d+\.\d\d ms  the-hog  at hog \(", report, re.MULTILINE)


def test_collections_are_counted_by_generation() -> None:
    trace = StepTrace()

    async def main() -> None:
        gc.collect(1)
        gc.collect(2)

    trio.run(main, instruments=[trace])
    assert trace.collections[1][0] >= 1
    assert trace.collections[2][0] >= 1
    assert gc.callbacks.count(trace._on_collect) == 0  # removed after the run


def test_settled_freezes_and_restores() -> None:
    before = gc.get_threshold()
    with settled():
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (YOUNG_THRESHOLD, *before[1:])
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before


async def test_serve_trace_steps_logs_the_report_and_loses_nothing(
    broker: Broker, tmp_path: Path
) -> None:
    topic = unique_topic()
    config = write_config(tmp_path / "c.toml", service_config(broker.bootstrap, topic))
    service = ServiceProcess.cli(config, "--trace-steps")
    try:
        url = await trio.to_thread.run_sync(service.url)
        ids = []
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            for n in range(50):
                response = await http.get(f"/docs/p{n}")
                assert response.status_code == 301
                ids.append(response.headers["x-hit-id"])
        code = await trio.to_thread.run_sync(service.terminate)
    finally:
        service.kill()
    assert code == 0, service.output
    steps = re.search(r"trio steps: ([\d,]+) \(mean", service.output)
    assert steps is not None, service.output
    assert int(steps.group(1).replace(",", "")) > 50
    assert "longest steps:" in service.output
    assert re.search(r"gc generation 0: [\d,]+ collections", service.output)
    await trio.to_thread.run_sync(check_delivery, broker, topic, service, dict.fromkeys(ids, 0), 1)
