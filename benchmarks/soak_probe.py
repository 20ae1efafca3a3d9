"""The service's CLI with a memory probe beside it, for benchmarks/soak.py.

    python benchmarks/soak_probe.py --dump DIR [--every 60] [--frames 1]
        [--no-tracemalloc] [--malloc-trim] [--gc-collect] -- serve --config c.toml

Runs ``redirect_logger.cli.main`` with the arguments after ``--``, and a
daemon thread that, every --every s, appends one JSON line to
``DIR/probe.jsonl``: the process's RSS, the Python heap as tracemalloc
traces it, pymalloc's allocated blocks, glibc's ``mallinfo2`` (what malloc
holds from the system, what of it is in use, what is free) and the count of
gc-tracked objects by type; and, under tracemalloc (--frames deep), dumps a
snapshot to ``DIR/snapshot-NNN.tm``. With --malloc-trim it then calls
``malloc_trim(0)`` and records RSS after it: what glibc held free, given
back. With --gc-collect it runs a full collection after the counts and
records what it found unreachable, by type (objects in reference cycles
that the service's raised thresholds had not yet collected; see heap.py).
Nothing of it is in the service's code: the probe only looks (and, with
those two options, frees).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import re
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path

from redirect_logger import cli


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",  # bytes from brk (main arena) / sbrk
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",  # bytes in mmapped chunks
            "usmblks",
            "fsmblks",
            "uordblks",  # bytes in use (not mmapped)
            "fordblks",  # bytes free (not mmapped)
            "keepcost",
        )
    ]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
_mallinfo2 = getattr(_libc, "mallinfo2", None)
if _mallinfo2 is not None:
    _mallinfo2.restype = _Mallinfo2


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def mappings_kib() -> dict[str, int]:
    """Resident KiB by kind of mapping (/proc/self/smaps): ``heap`` (glibc's
    main arena, grown by brk), ``anon`` (other anonymous mappings: glibc's
    thread arenas and large blocks, pymalloc's arenas, thread stacks) and
    ``file`` (code and data of the interpreter and its libraries)."""
    out = {"heap": 0, "anon": 0, "file": 0}
    kind = "anon"
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header
            name = fields[5] if len(fields) > 5 else ""
            kind = "heap" if name == "[heap]" else "file" if name.startswith("/") else "anon"
        elif fields[0] == "Rss:":
            out[kind] += int(fields[1])
    return out


def pymalloc_arenas() -> int:
    """Bytes in pymalloc's arenas now (``sys._debugmallocstats``, which
    writes to the C stderr: caught in a file for the call, and any other
    line written there meanwhile passed on)."""
    saved = os.dup(2)
    with tempfile.TemporaryFile("w+") as caught:
        os.dup2(caught.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        caught.seek(0)
        text = caught.read()
    found = re.search(r"^(\d+) arenas \* (\d+) bytes/arena", text, re.M)
    return int(found.group(1)) * int(found.group(2)) if found else -1


def threads() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def mallinfo() -> dict[str, int]:
    """glibc's view, all arenas: ``arena`` (held, non-mmapped), ``in_use``,
    ``free`` and ``mmapped`` bytes; {} if this libc has no mallinfo2."""
    if _mallinfo2 is None:
        return {}
    info = _mallinfo2()
    return {
        "arena": info.arena,
        "in_use": info.uordblks,
        "free": info.fordblks,
        "mmapped": info.hblkhd,
    }


def _name(kind: type) -> str:
    module = kind.__dict__.get("__module__", "builtins")
    return f"{module if isinstance(module, str) else '?'}.{kind.__qualname__}"


def sample(dump: Path, index: int, trim: bool, collect: bool) -> dict[str, object]:
    started = time.monotonic()
    line: dict[str, object] = {
        "t": time.time(),
        "rss_kib": rss_kib(),
        "blocks": sys.getallocatedblocks(),
        "malloc": mallinfo(),
        "maps": mappings_kib(),
        "pymalloc_arenas": pymalloc_arenas(),
        "threads": threads(),
    }
    if tracemalloc.is_tracing():
        line["traced"] = tracemalloc.get_traced_memory()[0]
        tracemalloc.take_snapshot().dump(str(dump / f"snapshot-{index:03d}.tm"))
    counts = Counter(map(type, gc.get_objects()))
    line["objects"] = sum(counts.values())
    line["types"] = {_name(kind): count for kind, count in counts.items()}
    if collect:
        # What a full collection finds unreachable (kept aside by DEBUG_SAVEALL
        # to be counted), then freed by a second one.
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            line["collected"] = gc.collect()
            found = Counter(map(type, gc.garbage))
            gc.garbage.clear()
        finally:
            gc.set_debug(0)
        gc.collect()
        line["garbage"] = {_name(kind): count for kind, count in found.most_common(20)}
        line["rss_after_collect_kib"] = rss_kib()
    if trim:
        line["rss_before_trim_kib"] = rss_kib()  # the sample's own allocations included
        _libc.malloc_trim(0)
        line["rss_after_trim_kib"] = rss_kib()
    line["took"] = round(time.monotonic() - started, 3)
    return line


def probe(dump: Path, every: float, trim: bool, collect: bool) -> None:
    index = 0
    with (dump / "probe.jsonl").open("a") as out:
        while True:
            try:
                line = sample(dump, index, trim, collect)
            except Exception as exc:  # the probe must not go quiet unnoticed
                line = {"t": time.time(), "error": repr(exc)}
            out.write(json.dumps(line) + "\n")
            out.flush()
            index += 1
            time.sleep(every)


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump", type=Path, required=True)
    parser.add_argument("--every", type=float, default=60.0)
    parser.add_argument("--frames", type=int, default=1)
    parser.add_argument("--no-tracemalloc", action="store_true")
    parser.add_argument("--malloc-trim", action="store_true")
    parser.add_argument("--gc-collect", action="store_true")
    args = parser.parse_args(argv[:split])
    args.dump.mkdir(parents=True, exist_ok=True)
    if not args.no_tracemalloc:
        tracemalloc.start(args.frames)
    threading.Thread(
        target=probe,
        args=(args.dump, args.every, args.malloc_trim, args.gc_collect),
        daemon=True,
    ).start()
    return cli.main(argv[split + 1 :])


if __name__ == "__main__":
    sys.exit(main())
