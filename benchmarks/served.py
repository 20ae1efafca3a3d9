"""``redirect-logger serve`` as a subprocess, for the benchmarks."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
BIND_RE = re.compile(r"Running on (https?://[0-9.]+:\d+)")
LEDGER_RE = re.compile(r"ledger (\{.*\})")


def write_config(
    path: Path,
    bootstrap: str,
    topic: str,
    spill: Path,
    *,
    server: str = "",
    records: str = "",
    kafka: str = "",
    shutdown: str = "",
    collect: str = "",
    spill_options: str = "",
) -> Path:
    """The benchmarks' service config: the ``docs`` rule (``/docs/*`` → 301 to
    ``https://docs.example.com/`` with the path and query forwarded), plus
    extra TOML lines per table (``[collect]`` is off unless ``collect`` says
    ``enabled = true``)."""
    if "max_connections_per_ip" not in server:
        # wrk's connections all come from 127.0.0.1, and /metrics is read on
        # the same port: up to 256 of them, the scrape would be the one refused.
        server = f"max_connections_per_ip = 0\n{server}"
    path.write_text(
        f"""[server]
bind = ["127.0.0.1:0"]
graceful_timeout = 5.0
{server}
[[rules]]
name = "docs"
path = "/docs/*"
target = "https://docs.example.com/"
status = 301
forward_path = true
[records]
topic = "{topic}"
{records}
[kafka]
"bootstrap.servers" = "{bootstrap}"
{kafka}
[spill]
directory = "{spill}"
{spill_options}
[shutdown]
{shutdown}
[collect]
{collect}
"""
    )
    return path


class Served:
    """The real CLI serving ``config``; ``url`` once it listens."""

    def __init__(
        self,
        config: Path,
        workers: int = 0,
        *,
        launcher: Sequence[str] = ("-m", "redirect_logger.cli"),
        env: Mapping[str, str] | None = None,
        cpus: Collection[int] = (),
    ) -> None:
        """``workers``: run ``serve --workers N`` (0: one process, no supervisor).
        ``launcher``: what runs the CLI, after the interpreter (a wrapper
        script that takes the CLI's arguments, say); ``env``: variables
        added to the service's environment; ``cpus``: the CPUs the service
        (its threads and any workers) may run on, set by ``taskset``, which
        then runs the service in its own process, so ``pid`` is still the
        service's; empty: wherever the caller may run."""
        command = [sys.executable, *launcher, "serve", "--config", str(config)]
        if cpus:
            command = ["taskset", "--cpu-list", ",".join(map(str, sorted(cpus))), *command]
        self.workers = workers
        self.process = subprocess.Popen(
            command + (["--workers", str(workers)] if workers else []),
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, **env} if env else None,
        )
        assert self.process.stderr is not None
        self.lines: list[str] = []
        found = None
        while found is None:
            line = self.process.stderr.readline()
            if not line:
                raise RuntimeError("the service did not start:\n" + "".join(self.lines))
            self.lines.append(line)
            found = BIND_RE.search(line)
        self.url = found.group(1)
        self.pid = self.process.pid
        # Its log is read on, so that a long run never stalls on a full pipe.
        self._reader = threading.Thread(target=self._read, args=(self.process.stderr,))
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line)

    def stop(self) -> dict[str, int]:
        """SIGTERM; the ledger the service logged at exit (summed over its workers)."""
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)
        self._reader.join(timeout=10)
        log = "".join(self.lines)
        ledgers = LEDGER_RE.findall(log)
        if len(ledgers) < max(self.workers, 1):
            raise RuntimeError("ledgers missing:\n" + log)
        ledger: dict[str, int] = {}
        for found in ledgers[-max(self.workers, 1) :]:
            for key, value in json.loads(found).items():
                ledger[key] = ledger.get(key, 0) + value
        return ledger
