"""The event loop's CPU per protobuf event, against JSON's and another commit's.

    python benchmarks/protobuf_read.py [--base REF] [--batch 100] [--rounds 9]
        [--seconds 0.2] [--profile]

In one process, with no server: the collect endpoint's reading of a body into
its events' JSON (what it does on the event loop, as collect_load.py's
``read_cost``), for

- JSON: collect_load.py's ``{"events": [...]}`` body of --batch events;
- protobuf: collect_load.py's body of --batch GPS reports, delimited, whose
  4-byte floats (altitude, speed, the satellites' SNR) are the same in every
  report, read by this tree's code and by the code of --base (default
  ``main``, taken from git into a temporary directory);
- protobuf, new floats: the same reports with every 4-byte float drawn at
  random (7 to 9 significant digits), by both; this tree's code forgets
  the floats it has written (protojson.py keeps them) before each body, so
  that none was seen before.

Each case runs for --seconds of CPU time (``time.process_time``) per round,
the cases interleaved in a rotating order, for --rounds rounds; the report
gives the best and the median of the rounds in µs per event, and the ratios.
Both trees' events must be byte for byte the same, or the script exits 1.
``--profile`` adds where this tree's protobuf time goes: the Batch parse
(with the framing), the JSON mapping and orjson, measured apart.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import random
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from google.protobuf.internal.encoder import _VarintBytes

import collect_load
from redirect_logger import protojson
from redirect_logger.collect import parse_events, written
from redirect_logger.protobuf import Decoder, load_schema

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 2**30  # bytes an event may have as JSON: no limit here


def _base_package(ref: str, into: Path) -> Any:
    """``redirect_logger`` at git ``ref``, imported as ``redirect_logger_base``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", ref, "src/redirect_logger"],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    (into / "src" / "redirect_logger").rename(into / "redirect_logger_base")
    sys.path.insert(0, str(into))
    return importlib.import_module("redirect_logger_base.protobuf")


def _new_floats_body(batch: int) -> bytes:
    """collect_load.py's reports, every 4-byte float a new random one."""
    rng = random.Random(15)
    four = struct.Struct("<f")
    message_class = collect_load._gps_class()
    body = b""
    for message_data in _messages(collect_load._protobuf_body(batch)):
        message = message_class.FromString(message_data)
        for holder, field in [(message.position, "altitude"), (message.position, "speed")] + [
            (satellite, "snr") for satellite in message.satellites
        ]:
            value = four.unpack(four.pack(rng.uniform(0.0, 9000.0)))[0]
            setattr(holder, field, value)
        data = message.SerializeToString()
        body += _VarintBytes(len(data)) + data
    return body


def _messages(body: bytes) -> list[bytes]:
    """The messages of a delimited body."""
    found, position = [], 0
    while position < len(body):
        length, shift = 0, 0
        while True:
            byte = body[position]
            position += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        found.append(body[position : position + length])
        position += length
    return found


def _unseen(read: Callable[[bytes], list[bytes]], body: bytes) -> list[bytes]:
    """``read(body)`` with no 4-byte float written before (the time includes
    forgetting them)."""
    protojson._WRITTEN.clear()
    return read(body)


def _cpu_per_event(function: Callable[[], object], batch: int, seconds: float) -> float:
    """µs of CPU per event of one round: ``function`` run for ``seconds``."""
    count, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        function()
        count += 1
    return (time.process_time() - start) / count / batch * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="main", help="git ref of the code to compare with")
    parser.add_argument("--batch", type=int, default=100, help="events a body")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--seconds", type=float, default=0.2, help="CPU s per case and round")
    parser.add_argument("--profile", action="store_true", help="this tree's protobuf stages")
    args = parser.parse_args()

    schema = load_schema(str(collect_load.GPS_SCHEMA), [], [collect_load.GPS])
    content_type = collect_load.PROTOBUF.encode()
    with tempfile.TemporaryDirectory(prefix="protobuf-read-") as work:
        base = _base_package(args.base, Path(work))
        readers = {
            "this": Decoder(schema, [collect_load.GPS], args.batch, LIMIT).reader(content_type),
            args.base: base.Decoder(schema, [collect_load.GPS], args.batch, LIMIT).reader(
                content_type
            ),
        }
        json_body = collect_load._body(args.batch)
        bodies = {
            "same floats": collect_load._protobuf_body(args.batch),
            "new floats": _new_floats_body(args.batch),
        }
        cases: dict[str, Callable[[], object]] = {
            "JSON": lambda: written(parse_events(json_body, "application/json", args.batch), LIMIT),
        }
        for body_name, body in bodies.items():
            events = {tree: read(body) for tree, read in readers.items()}
            if len({tuple(found) for found in events.values()}) != 1:
                print(f"protobuf, {body_name}: the trees' events differ", file=sys.stderr)
                return 1
            for tree, read in readers.items():
                case = f"protobuf, {body_name}, {tree}"
                if body_name == "new floats" and tree == "this":
                    cases[case] = lambda read=read, body=body: _unseen(read, body)
                else:
                    cases[case] = lambda read=read, body=body: read(body)
        if args.profile:
            cases.update(_stages(schema, bodies["same floats"], args.batch))

        load = os.getloadavg()
        figures: dict[str, list[float]] = {name: [] for name in cases}
        names = list(cases)
        for round_ in range(args.rounds):
            turn = round_ % len(names)
            for name in names[turn:] + names[:turn]:  # a rotating order
                figures[name].append(_cpu_per_event(cases[name], args.batch, args.seconds))
        load_after = os.getloadavg()

    print(
        f"{args.rounds} rounds of {args.seconds:g} s of CPU per case, {args.batch} events a "
        f"body; load average {load[0]:.1f} before, {load_after[0]:.1f} after (1 min)"
    )
    print()
    print("| case | best µs per event | median | spread (max ÷ min) |")
    print("| --- | --- | --- | --- |")
    for name, values in figures.items():
        print(
            f"| {name} | {min(values):.2f} | {statistics.median(values):.2f} | "
            f"{max(values) / min(values):.2f} |"
        )
    print()
    json_best = min(figures["JSON"])
    for body_name in bodies:
        this = min(figures[f"protobuf, {body_name}, this"])
        other = min(figures[f"protobuf, {body_name}, {args.base}"])
        print(
            f"- protobuf, {body_name}: this tree {other / this:.2f} times as fast as "
            f"{args.base} (best of rounds); {this / json_best:.1f} times JSON's µs per event "
            f"({other / json_best:.1f} at {args.base})"
        )
    return 0


def _stages(schema: bytes, body: bytes, batch: int) -> dict[str, Callable[[], object]]:
    """This tree's protobuf reading, stage by stage (each case per event)."""
    import orjson

    decoder = Decoder(schema, [collect_load.GPS], batch, LIMIT)
    _, convert, batch_class = decoder._types[collect_load.GPS]

    def parse() -> object:
        items = decoder._items(body, batch_class)
        assert items is not None
        return list(items)

    items = decoder._items(body, batch_class)
    assert items is not None
    dicts = [convert(item) for item in items]
    return {
        "stage: framing and Batch parse (and each item's object)": parse,
        "stage: JSON mapping": lambda: [convert(item) for item in items],
        "stage: orjson": lambda: [orjson.dumps(found) for found in dicts],
    }


if __name__ == "__main__":
    sys.exit(main())
