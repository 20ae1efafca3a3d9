"""The spill journal: an append-only, checksummed, size-capped store on local disk
for records Kafka could not take, kept until a replay has them delivered.

On disk: a directory of segment files ``segment-<20-digit sequence>.log``.
Each record is ``length (u32) | crc32 (u32) | timestamp_ms (i64) | key length
(i32, -1 for none) | key | value``, big-endian, where ``length`` counts every
byte after the CRC and the CRC covers them all. A torn or corrupt tail is
detected by length and checksum; everything before it is kept.

Methods are thread-safe: records are appended from worker threads and from
librdkafka's delivery-report thread. Nothing here touches Trio.
"""

from __future__ import annotations

import os
import struct
import threading
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from .hits import Encoded

FsyncPolicy = Literal["always", "interval", "never"]

_HEADER = struct.Struct(">II")  # length, crc32
_FIELDS = struct.Struct(">qi")  # timestamp_ms, key length (-1: no key)
_PREFIX, _SUFFIX = "segment-", ".log"


class JournalError(Exception):
    """The journal directory cannot be used."""


@dataclass(frozen=True)
class SegmentRead:
    """What a segment holds: its intact records, and where a bad tail starts."""

    records: list[Encoded]
    corrupt_at: int | None  # byte offset of a torn or corrupt tail; None if intact


def _frame(record: Encoded) -> bytes:
    key = record.key
    body = _FIELDS.pack(record.timestamp_ms, -1 if key is None else len(key))
    body += (key or b"") + record.value
    return _HEADER.pack(len(body), zlib.crc32(body)) + body


def _unframe(body: bytes) -> Encoded:
    timestamp_ms, key_length = _FIELDS.unpack_from(body)
    start = _FIELDS.size
    if key_length < 0:
        return Encoded(None, body[start:], timestamp_ms)
    return Encoded(body[start : start + key_length], body[start + key_length :], timestamp_ms)


def read_segment(path: Path) -> SegmentRead:
    """Every intact record of a segment, in order, up to the first bad one."""
    data = path.read_bytes()
    records: list[Encoded] = []
    offset = 0
    while offset < len(data):
        if offset + _HEADER.size > len(data):
            return SegmentRead(records, offset)
        length, crc = _HEADER.unpack_from(data, offset)
        body = data[offset + _HEADER.size : offset + _HEADER.size + length]
        if len(body) != length or length < _FIELDS.size or zlib.crc32(body) != crc:
            return SegmentRead(records, offset)
        key_length = _FIELDS.unpack_from(body)[1]
        if key_length > length - _FIELDS.size:
            return SegmentRead(records, offset)
        records.append(_unframe(body))
        offset += _HEADER.size + length
    return SegmentRead(records, None)


class Journal:
    """Appends records to the active segment; sealed segments await replay."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        segment_bytes: int,
        fsync: FsyncPolicy = "interval",
        fsync_interval: float = 1.0,  # s, for fsync = "interval"
    ) -> None:
        self.directory = directory
        self._max_bytes = max_bytes
        self._segment_bytes = segment_bytes
        self._fsync = fsync
        self._fsync_interval = fsync_interval
        self._lock = threading.Lock()
        self._active: BinaryIO | None = None
        self._active_path: Path | None = None
        self._last_sync = time.monotonic()
        try:
            directory.mkdir(parents=True, exist_ok=True)
            existing = self._segment_paths()
        except OSError as exc:
            raise JournalError(f"spill directory {directory}: {exc.strerror or exc}") from exc
        self._next = int(existing[-1].name[len(_PREFIX) : -len(_SUFFIX)]) + 1 if existing else 0
        self._bytes = sum(path.stat().st_size for path in existing)

    @property
    def size(self) -> int:
        """Bytes on disk in all segments."""
        return self._bytes

    def _segment_paths(self) -> list[Path]:
        return sorted(self.directory.glob(f"{_PREFIX}*{_SUFFIX}"))

    def append(self, records: Iterable[Encoded]) -> int:
        """Append records in order; return how many fit under ``max_bytes``.

        The rest were not written: the caller counts them as dropped. Raises
        OSError if the disk refuses a write.
        """
        written = 0
        with self._lock:
            for record in records:
                frame = _frame(record)
                if self._bytes + len(frame) > self._max_bytes:
                    break
                active = self._writable(len(frame))
                active.write(frame)
                self._bytes += len(frame)
                written += 1
            if written and self._active is not None:
                self._sync(self._active)
        return written

    def _writable(self, frame_size: int) -> BinaryIO:
        active = self._active
        if active is not None and active.tell() + frame_size > self._segment_bytes:
            self._close_active()
            active = None
        if active is None:
            self._active_path = self.directory / f"{_PREFIX}{self._next:020d}{_SUFFIX}"
            self._next += 1
            active = self._active = self._active_path.open("ab")
        return active

    def _sync(self, active: BinaryIO) -> None:
        active.flush()
        now = time.monotonic()
        if self._fsync == "always" or (
            self._fsync == "interval" and now - self._last_sync >= self._fsync_interval
        ):
            os.fsync(active.fileno())
            self._last_sync = now

    def _close_active(self) -> None:
        if self._active is not None:
            self._active.flush()
            if self._fsync != "never":
                os.fsync(self._active.fileno())
            self._active.close()
            self._active = None
            self._active_path = None

    def seal(self) -> list[Path]:
        """Close the active segment; return every segment, oldest first."""
        with self._lock:
            self._close_active()
            return self._segment_paths()

    def delete(self, path: Path) -> None:
        """Remove a sealed segment (once each of its records is delivered)."""
        with self._lock:
            if path == self._active_path:
                raise ValueError(f"{path} is the active segment")
            size = path.stat().st_size
            path.unlink()
            self._bytes -= size

    def close(self) -> None:
        with self._lock:
            self._close_active()
