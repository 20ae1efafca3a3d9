"""What holds the event loop: a Trio instrument for ``serve --trace-steps``.

Every request, every worker batch and every thread hand-off runs on the one
Trio thread, one task step at a time. A request's latency is the sum of the
steps that run before its own: a long step anywhere is a tail for everyone.
``StepTrace`` times each step and each scheduler pass (the steps run between
two waits for I/O) and keeps the longest, with the task that ran and where it
stopped, which is where its step's work was (docs/benchmarks.md shows how it
is used). It costs about a microsecond a step, so it is off unless asked for.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import os
from collections import Counter
from dataclasses import dataclass
from time import perf_counter

import trio

# Upper bounds of the step-duration histogram, in seconds.
BOUNDS = (0.0001, 0.0005, 0.001, 0.005, 0.02, 0.1)
_WHERE_DEPTH = 3  # innermost frames kept for a long step
_BUSIEST = 8  # tasks listed by time spent in their steps
_TRIO = os.path.dirname(trio.__file__)


@dataclass(frozen=True, order=True)
class Long:
    """One long step (or pass): its duration (s), then what ran."""

    seconds: float
    order: int  # keeps heap entries comparable; insertion order
    task: str
    where: str  # the innermost frames the task stopped in ("" for a pass)


class StepTrace(trio.abc.Instrument):
    """Times every task step and scheduler pass; keeps the ``keep`` longest of each.

    Read ``report()`` at any time (it is a snapshot). Must be installed with
    ``trio.run(..., instruments=[trace])`` or ``trio.lowlevel.add_instrument``.
    """

    def __init__(self, keep: int = 15) -> None:
        self.keep = keep
        self.steps = 0
        self.step_seconds = 0.0
        self.steps_by_task: Counter[str] = Counter()
        self.seconds_by_task: dict[str, float] = {}
        self.histogram = [0] * (len(BOUNDS) + 1)  # the last: longer than every bound
        self.passes = 0
        self.longest_steps: list[Long] = []  # a min-heap: [0] is the shortest kept
        self.longest_passes: list[Long] = []
        self._order = itertools.count()
        self._step_began = 0.0
        self._pass_began: float | None = None
        self._pass_steps = 0
        # The cyclic garbage collector's pauses, by generation: count, seconds, longest.
        self.collections: dict[int, list[float]] = {g: [0, 0.0, 0.0] for g in range(3)}
        self._collect_began = 0.0

    def before_run(self) -> None:
        gc.callbacks.append(self._on_collect)

    def after_run(self) -> None:
        gc.callbacks.remove(self._on_collect)

    def _on_collect(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._collect_began = perf_counter()
            return
        seconds = perf_counter() - self._collect_began
        figures = self.collections[info["generation"]]
        figures[0] += 1
        figures[1] += seconds
        figures[2] = max(figures[2], seconds)

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._step_began = perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        seconds = perf_counter() - self._step_began
        self.steps += 1
        self._pass_steps += 1
        self.step_seconds += seconds
        self.steps_by_task[task.name] += 1
        self.seconds_by_task[task.name] = self.seconds_by_task.get(task.name, 0.0) + seconds
        for index, bound in enumerate(BOUNDS):
            if seconds <= bound:
                self.histogram[index] += 1
                break
        else:
            self.histogram[-1] += 1
        heap = self.longest_steps
        if len(heap) < self.keep or seconds > heap[0].seconds:
            self._push(heap, Long(seconds, next(self._order), task.name, _where(task)))

    def after_io_wait(self, timeout: float) -> None:
        self._pass_began = perf_counter()
        self._pass_steps = 0

    def before_io_wait(self, timeout: float) -> None:
        if self._pass_began is None:
            return
        seconds = perf_counter() - self._pass_began
        self.passes += 1
        heap = self.longest_passes
        if len(heap) < self.keep or seconds > heap[0].seconds:
            label = f"{self._pass_steps} steps"
            self._push(heap, Long(seconds, next(self._order), label, ""))

    def _push(self, heap: list[Long], entry: Long) -> None:
        if len(heap) < self.keep:
            heapq.heappush(heap, entry)
        else:
            heapq.heapreplace(heap, entry)

    def report(self) -> str:
        """The figures, as lines of text: the step histogram, then the longest
        steps and passes, longest first."""
        mean = self.step_seconds / self.steps * 1e6 if self.steps else 0.0
        lines = [f"trio steps: {self.steps:,} (mean {mean:.1f} us), passes: {self.passes:,}"]
        lower = 0.0
        for bound, count in zip((*BOUNDS, float("inf")), self.histogram, strict=True):
            span = f"> {lower * 1000:g} ms" if bound == float("inf") else f"<= {bound * 1000:g} ms"
            lines.append(f"  steps {span}: {count:,}")
            lower = bound
        for generation, (collected, seconds, longest) in self.collections.items():
            lines.append(
                f"  gc generation {generation}: {collected:,.0f} collections,"
                f" {seconds * 1000:.1f} ms in all, longest {longest * 1000:.2f} ms"
            )
        lines.append("busiest tasks (steps, time in them):")
        busiest = sorted(self.seconds_by_task.items(), key=lambda item: -item[1])
        for name, seconds in busiest[:_BUSIEST]:
            lines.append(f"  {self.steps_by_task[name]:10,} {seconds * 1000:10.1f} ms  {name}")
        lines.append("longest steps:")
        for entry in sorted(self.longest_steps, reverse=True):
            lines.append(f"  {entry.seconds * 1000:8.2f} ms  {entry.task}  at {entry.where}")
        lines.append("longest passes:")
        for entry in sorted(self.longest_passes, reverse=True):
            lines.append(f"  {entry.seconds * 1000:8.2f} ms  {entry.task}")
        return "\n".join(lines)


def _where(task: trio.lowlevel.Task) -> str:
    """The innermost frames a task is suspended in, innermost last, leaving
    out Trio's own (which every suspension ends in)."""
    frames = [
        f"{frame.f_code.co_name} ({frame.f_globals.get('__name__', '?')}:{line})"
        for frame, line in task.iter_await_frames()
        if not frame.f_code.co_filename.startswith(_TRIO)
    ]
    return " > ".join(frames[-_WHERE_DEPTH:]) or "(finished)"
