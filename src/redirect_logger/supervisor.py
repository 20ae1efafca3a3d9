"""``redirect-logger serve --workers N``: one machine's worker processes.

A small Trio program whose nursery's children are the workers
(``trio.run_process``). It binds the listening sockets once and passes them
to every worker, so the workers accept from one queue (as Hypercorn's own
master does) and connections wait in it while a worker restarts. Each worker
is a ``serve`` process with its own root nursery, pipeline, producer, journal
slot and ledger; ``group.py`` gives their metrics one view.

- SIGTERM or SIGINT: forwarded to every worker as SIGTERM; each drains as a
  single ``serve`` does, and the supervisor waits for all of them.
- SIGHUP: forwarded; each worker reloads the rules from the config file.
- A worker that dies is started again (after 1 s, doubling up to 30 s while
  it keeps dying young); the new one claims a free journal slot and every
  worker's replay takes over the dead one's, ids kept.
- A worker that finds the config unusable (exit 2) stops the group.

The exit status is 0 only when every worker's last ledger was clean: 3 when a
worker exited with records lost, or when one died under
``records.durability = "memory"`` (what it held in memory is gone); 2 for a
config error; 1 for any other failure of a worker.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from socket import socket

import trio
from hypercorn.utils import repr_socket_addr

from . import group
from .config import Settings
from .devbroker import run_dev_broker
from .server import hypercorn_config
from .service import EXIT_OK, EXIT_RECORDS_LOST

log = logging.getLogger(__name__)

EXIT_FAILURE = 1
EXIT_CONFIG = 2
WORKER_FDS = "REDIRECT_LOGGER_WORKER_FDS"  # the listening sockets a worker serves
RESTART_DELAY = 1.0  # s before a dead worker is started again
RESTART_DELAY_MAX = 30.0  # s; the delay doubles while workers die young
YOUNG = 60.0  # s; a worker that dies younger than this doubles the delay


def bind_listeners(settings: Settings) -> list[socket]:
    """Bind and listen on ``server.bind`` then ``server.admin_bind``, with the
    options ``serve`` uses. Raises OSError if an address cannot be bound."""
    config = hypercorn_config(settings)
    sockets = config.create_sockets()
    listeners = [*sockets.secure_sockets, *sockets.insecure_sockets]
    for sock in listeners:
        sock.listen(config.backlog)
    return listeners


def worker_fds() -> list[int] | None:
    """The listening sockets this process got from a supervisor, or None."""
    value = os.environ.get(WORKER_FDS)
    return [int(fd) for fd in value.split(",")] if value else None


def _as_worker() -> None:
    """In a new worker before it runs: SIGINT and SIGHUP are ignored until the
    worker handles them. A terminal's Ctrl+C reaches the whole process group;
    the supervisor sends each worker SIGTERM instead. A worker handles
    SIGHUP once it serves, and it reads the config file at start anyway."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


async def watch_supervisor(stop: trio.Event, supervisor: int) -> None:
    """In a worker: stop (and drain) if the supervisor dies, as at SIGTERM."""
    while os.getppid() == supervisor:  # noqa: ASYNC110 (no event tells of a parent's death)
        await trio.sleep(1.0)
    log.error("the supervisor (pid %d) is gone: draining and stopping", supervisor)
    stop.set()


async def _wait_for_exit(process: trio.Process) -> None:
    """``run_process``'s cancellation, which the supervisor never asks for:
    SIGTERM, then wait as long as the worker's drain takes."""
    process.terminate()
    await process.wait()


@dataclass
class _Group:
    command: list[str]
    env: dict[str, str]
    fds: tuple[int, ...]
    durable: bool  # records.durability is not "memory": a killed worker loses no answered hit
    stop: trio.Event = field(default_factory=trio.Event)
    processes: dict[int, trio.Process] = field(default_factory=dict)
    codes: dict[int, int] = field(default_factory=dict)  # each slot's last exit code
    lost_in_memory: int = 0  # deaths that took answered hits held in memory along
    config_error: bool = False

    def signal_all(self, signum: int) -> None:
        for process in list(self.processes.values()):
            if process.returncode is None:
                process.send_signal(signum)

    def stop_all(self) -> None:
        if not self.stop.is_set():
            self.stop.set()
            self.signal_all(signal.SIGTERM)

    async def keep(self, slot: int) -> None:
        """Run worker ``slot`` until the group stops, starting it again each
        time it dies."""
        delay = RESTART_DELAY
        while True:
            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                process: trio.Process = await nursery.start(
                    partial(
                        trio.run_process,
                        self.command,
                        check=False,
                        pass_fds=self.fds,
                        env=self.env,
                        preexec_fn=_as_worker,
                        deliver_cancel=_wait_for_exit,
                    )
                )
                self.processes[slot] = process
                log.info("worker %d started: pid %d", slot, process.pid)
                if self.stop.is_set():  # the stop came while it was being started
                    process.terminate()
            del self.processes[slot]
            code = process.returncode
            assert code is not None
            self.codes[slot] = code
            if self.stop.is_set():
                if code == -signal.SIGTERM:  # stopped before it handled signals: nothing served
                    self.codes[slot] = EXIT_OK
                elif code < 0 and not self.durable:  # killed while it drained
                    self.lost_in_memory += 1
                log.info("worker %d (pid %d) exited: %s", slot, process.pid, _describe(code))
                return
            if code == EXIT_CONFIG:
                log.error("worker %d: the config cannot be used; stopping every worker", slot)
                self.config_error = True
                self.stop_all()
                return
            if not self.durable:
                self.lost_in_memory += 1
            age = trio.current_time() - started
            delay = min(delay * 2, RESTART_DELAY_MAX) if age < YOUNG else RESTART_DELAY
            log.error(
                "worker %d (pid %d) died: %s, after %.1f s; starting it again in %.0f s%s",
                slot,
                process.pid,
                _describe(code),
                age,
                delay,
                ""
                if self.durable
                else '; under records.durability = "memory" its records in memory are lost',
            )
            with trio.move_on_after(delay):
                await self.stop.wait()
            if self.stop.is_set():
                return

    def exit_code(self) -> int:
        if self.config_error:
            return EXIT_CONFIG
        codes = set(self.codes.values())
        if EXIT_RECORDS_LOST in codes or self.lost_in_memory:
            return EXIT_RECORDS_LOST
        return EXIT_OK if codes <= {EXIT_OK} else EXIT_FAILURE


def _describe(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


async def _forward_signals(
    workers: _Group, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                log.info("SIGHUP: every worker reloads the rules")
                workers.signal_all(signal.SIGHUP)
            elif workers.stop.is_set():
                log.warning("%s again: the workers' drains are bounded already", name)
            else:
                log.info("%s: stopping every worker; each drains", name)
                workers.stop_all()


async def supervise(
    settings: Settings,
    argv: Sequence[str],
    count: int,
    *,
    dev_broker: bool = False,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Run ``count`` workers, each ``redirect-logger serve`` with ``argv``,
    until SIGTERM/SIGINT (or until a worker finds the config unusable), then
    wait for each to drain. Reports the bound addresses as started; returns
    the group's exit code. Raises OSError if an address cannot be bound."""
    listeners = bind_listeners(settings)
    fds = tuple(sock.fileno() for sock in listeners)
    addresses = [f"http://{repr_socket_addr(s.family, s.getsockname())}" for s in listeners]
    directory = tempfile.mkdtemp(prefix="redirect-logger-group-")
    env = {**os.environ, WORKER_FDS: ",".join(map(str, fds)), group.ENV_VAR: directory}
    workers = _Group(
        [sys.executable, "-m", "redirect_logger.cli", "serve", *argv],
        env,
        fds,
        durable=settings.records.durability != "memory",
    )
    try:
        async with trio.open_nursery() as root:
            await root.start(_forward_signals, workers)
            if dev_broker:
                await root.start(run_dev_broker, str(settings.kafka["bootstrap.servers"]))
            log.info("%d workers serving on %s", count, " ".join(addresses))
            task_status.started(addresses)
            async with trio.open_nursery() as nursery:
                for slot in range(count):
                    nursery.start_soon(workers.keep, slot)
            root.cancel_scope.cancel()
    finally:
        for sock in listeners:
            sock.close()
        shutil.rmtree(Path(directory), ignore_errors=True)
    code = workers.exit_code()
    level = logging.INFO if code == EXIT_OK else logging.ERROR
    log.log(
        level,
        "group exit code %d: workers' last exit codes %s%s",
        code,
        [workers.codes.get(slot) for slot in range(count)],
        f", {workers.lost_in_memory} died holding records in memory"
        if workers.lost_in_memory
        else "",
    )
    return code
