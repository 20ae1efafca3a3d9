"""One view of a group of worker processes: each ``/metrics`` scrape sums them.

The workers of one launch (``serve --workers N``, or ``hypercorn --workers
N``) share a directory. Each serves its own exposition on a Unix socket
there; a scrape of any worker reads every member's and sums them, so the
ledger, queue depths and histograms describe the whole group whichever
worker the connection reached. Reading live members (rather than files
written now and then) keeps each scrape exact: a worker's counters are read
at the moment of the scrape, each consistent in itself.

A worker that dies leaves the sum with its counters (Prometheus sees a
counter reset, which ``rate()`` handles); its socket file is removed by the
next scrape that finds nobody listening.
"""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

ENV_VAR = "REDIRECT_LOGGER_GROUP_DIR"  # set by ``serve --workers N`` for its workers
READ_TIMEOUT = 1.0  # s for all members together; a member that does not answer is left out
MAX_EXPOSITION = 16 * 1024 * 1024  # bytes read from one member at most


def group_directory() -> Path | None:
    """The directory this process's group shares, or None when it runs alone.

    ``serve --workers N`` names it in ``REDIRECT_LOGGER_GROUP_DIR``. A
    worker of ``hypercorn --workers N`` (a child of Hypercorn's master by
    multiprocessing) uses one per master under ``$XDG_RUNTIME_DIR`` or the
    temporary directory.
    """
    named = os.environ.get(ENV_VAR)
    if named:
        return Path(named)
    master = multiprocessing.parent_process()
    if master is None or master.pid is None:
        return None
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    return base / f"redirect-logger-{os.getuid()}" / f"group-{master.pid}"


def _private_directory(directory: Path) -> None:
    """Create ``directory`` for this user only (and its per-user parent, unless
    a supervisor made it); raise OSError if one exists that another user owns
    or may write to."""
    for path in (directory,) if os.environ.get(ENV_VAR) else (directory.parent, directory):
        path.mkdir(mode=0o700, exist_ok=True)
        info = path.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
            raise OSError(errno.EPERM, "not a directory of this user's alone", str(path))


async def serve_member(
    directory: Path,
    exposition: Callable[[], bytes],
    *,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve this process's ``exposition()`` on ``directory/<pid>.sock`` until
    cancelled, then remove the socket. Each connection gets the exposition
    and is closed. Reports the socket's path as started; raises OSError if the
    directory cannot be used."""
    await trio.to_thread.run_sync(_private_directory, directory)
    path = directory / f"{os.getpid()}.sock"
    with trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM) as sock:
        path.unlink(missing_ok=True)  # a pid reused after a kill
        await sock.bind(str(path))
        sock.listen(16)
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(path)
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(_answer, stream, exposition)
        finally:
            path.unlink(missing_ok=True)


async def _answer(stream: trio.SocketStream, exposition: Callable[[], bytes]) -> None:
    async with stream:
        with trio.move_on_after(READ_TIMEOUT):
            await stream.send_all(exposition())


async def read_members(directory: Path, own: Path | None) -> list[bytes]:
    """The expositions of the group's other live members, read within
    ``READ_TIMEOUT`` s. A socket nobody listens on (its worker died) is removed."""
    paths = [path for path in await trio.Path(directory).glob("*.sock") if Path(path) != own]
    found: list[bytes] = []
    with trio.move_on_after(READ_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for path in paths:
                nursery.start_soon(_read_member, path, found)
    return found


async def _read_member(path: trio.Path, found: list[bytes]) -> None:
    try:
        stream = await trio.open_unix_socket(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        await trio.Path(path).unlink(missing_ok=True)  # its process is gone
        return
    except OSError as exc:
        log.warning("metrics of group member %s unreadable: %s", path.name, exc)
        return
    chunks: list[bytes] = []
    size = 0
    async with stream:
        while size < MAX_EXPOSITION:
            chunk = await stream.receive_some(65536)
            if not chunk:
                found.append(b"".join(chunks))
                return
            chunks.append(chunk)
            size += len(chunk)
    log.warning("metrics of group member %s too large; left out", path.name)


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def merge(expositions: list[bytes]) -> bytes:
    """One exposition for the group: each sample summed over the members (so
    ``ready`` and ``broker_reachable`` count the workers that are), but
    ``_created`` timestamps: the earliest. Families keep the first member's
    order; a family or label set only some members have is summed over those."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in expositions:
        for family in text_string_to_metric_families(text.decode()):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            least = family.name.endswith("_created")
            into = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in into:
                    into[key] = sample.value
                elif least:
                    into[key] = min(into[key], sample.value)
                else:
                    into[key] += sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)
