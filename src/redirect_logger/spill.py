"""The spill journal: an append-only, checksummed, size-capped store on local disk
for records Kafka could not take, kept until a replay has them delivered.

On disk, under ``spill.directory``: one ``slot-<n>`` directory per running
process (a process holds an exclusive ``flock`` on its slot's ``lock`` file, so
``hypercorn --workers N`` processes never share one), each holding segment
files ``segment-<20-digit sequence>.log``. Each record is one frame,
big-endian: ``marker (u32) | length (u32) | crc32 (u32) | timestamp_ms (i64)
| topic length (u16) | key length (i32, -1 for none) | headers length (u32) |
topic | key | headers | value``, where the headers are, each, ``name length
(u16) | value length (u32) | name | value``. ``length`` counts every byte
after the CRC, and the CRC covers every byte of the frame but itself. The
marker is ``0x80000002``: format 2. Format 1, written before headers, is
``length (u32) | crc32 (u32)`` and the same fields without the headers; its
``length`` is below 2**31, which is how a reader tells the two apart, and its
CRC covers what follows it. Both are read; a format-1 record gets the headers
its value implies (``hits.headers_of_value``). A torn or corrupt tail (or a
frame of an unknown format) is detected by marker, length and checksum;
everything before it is kept.

Methods are thread-safe: records are appended from worker threads and from
librdkafka's delivery-report thread. Nothing here touches Trio.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, NamedTuple

from .hits import Encoded, MessageHeaders, headers_of_value
from .ledger import Ledger
from .logs import RateLimitedLog

log = logging.getLogger(__name__)

FsyncPolicy = Literal["always", "interval", "never"]

_MARKER = 0x8000_0002  # format 2; a format-1 frame starts with its length, below 2**31
_HEADER = struct.Struct(">III")  # marker, length, crc32
# timestamp_ms, topic length, key length (-1: no key), headers length
_FIELDS = struct.Struct(">qHiI")
_ONE_HEADER = struct.Struct(">HI")  # a message header's name length, value length
_V1_HEADER = struct.Struct(">II")  # format 1: length, crc32
_V1_FIELDS = struct.Struct(">qHi")  # format 1: timestamp_ms, topic length, key length
_WORD = struct.Struct(">I")
_PREFIX, _SUFFIX = "segment-", ".log"
_ACKED = ".acked"  # a segment's acknowledgement marks: segment-<sequence>.acked
_SLOT = "slot-"
CORRUPT_SUFFIX = ".corrupt"


class JournalError(Exception):
    """The journal directory cannot be used."""


class PartialWrite(OSError):
    """The disk refused a write; the first ``written`` records are in the journal."""

    def __init__(self, written: int, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.written = written


@dataclass(frozen=True)
class SegmentRead:
    """What a segment holds: its intact records, and where a bad tail starts."""

    records: list[Encoded]
    corrupt_at: int | None  # byte offset of a torn or corrupt tail; None if intact


def _frame(record: Encoded) -> bytes:
    """The record as a format-2 frame."""
    key, topic = record.key, record.topic.encode()
    parts: list[bytes] = []
    for name, value in record.headers:
        encoded = name.encode()
        parts += (_ONE_HEADER.pack(len(encoded), len(value)), encoded, value)
    headers = b"".join(parts)
    body = _FIELDS.pack(
        record.timestamp_ms, len(topic), -1 if key is None else len(key), len(headers)
    )
    body += topic + (key or b"") + headers + record.value
    marked = _WORD.pack(_MARKER) + _WORD.pack(len(body))
    return marked + _WORD.pack(zlib.crc32(body, zlib.crc32(marked))) + body


def _unframe(body: bytes) -> Encoded | None:
    """The record in an intact format-2 body, or None if its lengths do not add up."""
    timestamp_ms, topic_length, key_length, headers_length = _FIELDS.unpack_from(body)
    start = _FIELDS.size + topic_length
    key_end = start + max(key_length, 0)
    headers_end = key_end + headers_length
    if headers_end > len(body):
        return None
    headers: MessageHeaders = []
    offset = key_end
    while offset < headers_end:
        if offset + _ONE_HEADER.size > headers_end:
            return None
        name_length, value_length = _ONE_HEADER.unpack_from(body, offset)
        name_end = offset + _ONE_HEADER.size + name_length
        if name_end + value_length > headers_end:
            return None
        name = body[offset + _ONE_HEADER.size : name_end].decode("utf-8", "replace")
        headers.append((name, body[name_end : name_end + value_length]))
        offset = name_end + value_length
    topic = body[_FIELDS.size : start].decode("utf-8", "replace")
    key = None if key_length < 0 else body[start:key_end]
    return Encoded(topic, key, body[headers_end:], timestamp_ms, headers)


def _unframe_v1(body: bytes) -> Encoded | None:
    """The record in an intact format-1 body (headers from its value), or None
    if its lengths do not add up."""
    timestamp_ms, topic_length, key_length = _V1_FIELDS.unpack_from(body)
    start = _V1_FIELDS.size + topic_length
    if start + max(key_length, 0) > len(body):
        return None
    topic = body[_V1_FIELDS.size : start].decode("utf-8", "replace")
    end = start + max(key_length, 0)
    key = None if key_length < 0 else body[start:end]
    return Encoded(topic, key, body[end:], timestamp_ms, headers_of_value(body[end:]))


def _read_frame(data: bytes, offset: int) -> tuple[Encoded, int] | None:
    """The record of the frame at ``offset`` and the offset after the frame,
    or None if the frame is torn, corrupt or of an unknown format."""
    if offset + _WORD.size > len(data):
        return None
    (first,) = _WORD.unpack_from(data, offset)
    if first == _MARKER:
        if offset + _HEADER.size > len(data):
            return None
        _, length, crc = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        body = data[start : start + length]
        marked = data[offset : offset + 2 * _WORD.size]
        if len(body) != length or length < _FIELDS.size:
            return None
        if zlib.crc32(body, zlib.crc32(marked)) != crc:
            return None
        record = _unframe(body)
    elif first < 0x8000_0000:  # format 1: the word is the length
        if offset + _V1_HEADER.size > len(data):
            return None
        length, crc = _V1_HEADER.unpack_from(data, offset)
        start = offset + _V1_HEADER.size
        body = data[start : start + length]
        if len(body) != length or length < _V1_FIELDS.size or zlib.crc32(body) != crc:
            return None
        record = _unframe_v1(body)
    else:
        return None
    return None if record is None else (record, start + length)


def _acked_path(segment: Path) -> Path:
    """The file of a segment's acknowledgement marks: one settled record id a line."""
    return segment.with_suffix(_ACKED)


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _number(path: Path) -> int:
    digits = path.name[len(_PREFIX) : len(_PREFIX) + 20]
    return int(digits) if digits.isdigit() else -1


class SegmentReader:
    """Reads a segment's records lazily, in order, up to the first bad one.

    ``corrupt_at`` is set once the iteration has reached a torn or corrupt
    tail (its byte offset); it stays None for an intact segment.
    """

    def __init__(self, path: Path) -> None:
        self._data = path.read_bytes()
        self.corrupt_at: int | None = None

    def __iter__(self) -> Iterator[Encoded]:
        data, offset = self._data, 0
        while offset < len(data):
            read = _read_frame(data, offset)
            if read is None:
                self.corrupt_at = offset
                return
            record, offset = read
            yield record


def read_segment(path: Path) -> SegmentRead:
    """Every intact record of a segment, in order, up to the first bad one."""
    reader = SegmentReader(path)
    records = list(reader)
    return SegmentRead(records, reader.corrupt_at)


@dataclass
class _Tally:
    """A segment this process wrote to: how many of its records are settled,
    and how many are still with the pipeline."""

    records: int = 0
    settled: int = 0  # acknowledged by Kafka, or refused for good (marked on disk)
    live: int = 0  # written ahead and still with the pipeline: not to be replayed


class Journal:
    """Appends records to the active segment; sealed segments await replay.

    ``max_bytes`` caps the segments of this directory together. A record is
    settled once Kafka has acknowledged it (or refused it for good): its id
    is appended to the segment's ``.acked`` file, the replay skips it, and a
    sealed segment whose every record is settled is deleted. Records written
    ahead (``write_ahead``) are live until the pipeline settles or releases
    them; a segment holding live records is not replayed.
    """

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
        self._slot_lock: int | None = None  # fd holding the slot's flock
        self._tallies: dict[Path, _Tally] = {}  # segments written by this process
        self._marks: dict[Path, list[bytes]] = {}  # settled ids not yet on disk
        try:
            directory.mkdir(parents=True, exist_ok=True)
            existing = self._segment_paths()
        except OSError as exc:
            raise JournalError(f"spill directory {directory}: {exc.strerror or exc}") from exc
        # Numbered after every segment, set-aside ones included, so a name is never reused.
        numbers = [_number(path) for path in directory.glob(f"{_PREFIX}*")]
        self._next = max(numbers, default=-1) + 1
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
        PartialWrite (saying how many records were written) if the disk
        refuses a write; a frame cut short by it is cut off the segment.
        """
        written = 0
        with self._lock:
            try:
                for record in records:
                    frame = _frame(record)
                    if self._bytes + len(frame) > self._max_bytes:
                        break
                    active = self._writable(len(frame))
                    try:
                        active.write(frame)
                        active.flush()
                    except OSError:
                        self._cut_back(active)
                        raise
                    self._bytes += len(frame)
                    self._tally().records += 1
                    written += 1
                if written and self._active is not None:
                    self._sync(self._active)
            except OSError as exc:
                raise PartialWrite(written, exc) from exc
        return written

    def write_ahead(self, records: Sequence[Encoded]) -> tuple[Path | None, int]:
        """Write a batch ahead of its delivery, in one write (and one fsync
        under ``fsync = "always"``), whole in one segment: as many records as
        fit under ``max_bytes`` (a prefix). Returns the segment and how many;
        they are live until ``settle``d or ``release``d. Raises PartialWrite
        (with ``written`` 0, the segment cut back) if the disk refuses the
        write or its fsync: then none of them is in the journal.
        """
        frames = [_frame(record) for record in records]
        with self._lock:
            size = fit = 0
            for frame in frames:
                if self._bytes + size + len(frame) > self._max_bytes:
                    break
                size += len(frame)
                fit += 1
            if not fit:
                return None, 0
            active = self._writable(size)
            path, start = self._active_path, active.tell()
            assert path is not None
            try:
                active.write(b"".join(frames[:fit]))
                active.flush()
                self._sync(active)
            except OSError as exc:
                self._cut_back(active, start)
                raise PartialWrite(0, exc) from exc
            self._bytes += size
            tally = self._tally()
            tally.records += fit
            tally.live += fit
        return path, fit

    def _tally(self) -> _Tally:
        assert self._active_path is not None
        tally = self._tallies.get(self._active_path)
        if tally is None:
            tally = self._tallies[self._active_path] = _Tally()
        return tally

    def settle(self, path: Path, ids: Sequence[bytes | None], *, live: bool) -> None:
        """Records of ``path`` are acknowledged (or refused for good): mark them
        (on disk at the next ``flush_marks``), and delete the segment once every
        record in it is settled and it is sealed. ``live``: records written
        ahead by this process, settled by its pipeline."""
        with self._lock:
            self._marks.setdefault(path, []).extend(i for i in ids if i is not None)
            tally = self._tallies.get(path)
            if tally is None:
                return
            tally.settled += len(ids)
            if live:
                tally.live -= len(ids)
            if tally.settled >= tally.records and path != self._active_path:
                self._delete(path)

    def release(self, path: Path, count: int) -> None:
        """``count`` live records of ``path`` could not be delivered now: they
        wait in the journal for a replay."""
        with self._lock:
            tally = self._tallies.get(path)
            if tally is not None:
                tally.live -= count

    def flush_marks(self) -> None:
        """Append the settled ids gathered since the last call to their
        segments' ``.acked`` files. Not fsynced: a mark lost to a power cut
        only makes the replay send that record again."""
        with self._lock:
            marks, self._marks = self._marks, {}
            for path, ids in marks.items():
                if ids and path.exists():
                    with _acked_path(path).open("ab") as file:
                        file.write(b"".join(i + b"\n" for i in ids))

    def settled_ids(self, path: Path) -> frozenset[bytes]:
        """The ids marked settled in ``path``'s ``.acked`` file (with those not
        written yet); a line cut short by a crash is left out."""
        self.flush_marks()
        try:
            data = _acked_path(path).read_bytes()
        except FileNotFoundError:
            return frozenset()
        lines = data.split(b"\n")
        return frozenset(lines[:-1])  # the last is empty, or cut short

    def replayable(self) -> list[Path]:
        """Sealed segments the replay may take, oldest first: those of other
        processes, and those of this one that hold records left for a replay
        (no longer live, not settled) and none live. The active segment is
        sealed first if it holds records left for a replay, so that they go
        as soon as its live ones are settled."""
        with self._lock:
            active = self._active_path
            if active is not None and self._left(self._tallies.get(active)):
                self._close_active()
            return [path for path in self._segment_paths() if self._ready(path)]

    def has_replayable(self) -> bool:
        """Whether the replay has something to take now, or once the active
        segment is sealed (without sealing it)."""
        with self._lock:
            active = self._active_path
            if active is not None and self._left(self._tallies.get(active)):
                return True
            return any(self._ready(path) for path in self._segment_paths())

    def _ready(self, path: Path) -> bool:
        """A sealed segment the replay may take now."""
        if path == self._active_path:
            return False
        tally = self._tallies.get(path)
        return tally is None or (tally.live == 0 and self._left(tally))

    @staticmethod
    def _left(tally: _Tally | None) -> bool:
        """Whether a segment of this process holds records left for a replay."""
        return tally is not None and tally.records - tally.settled - tally.live > 0

    def _cut_back(self, active: BinaryIO, to: int | None = None) -> None:
        """After a failed write: drop the segment's unwritten tail (from ``to``,
        or from its first bad frame), or at least close it so the next record
        starts a fresh segment."""
        path = self._active_path
        self._active = None
        self._active_path = None
        with contextlib.suppress(OSError):
            active.close()
        if path is None:
            return
        try:
            corrupt_at = read_segment(path).corrupt_at if to is None else to
            if corrupt_at is not None:
                os.truncate(path, corrupt_at)
        except OSError:
            pass

    def _writable(self, size: int) -> BinaryIO:
        """The active segment, or a new one if ``size`` more bytes would take
        a non-empty active one past ``segment_bytes``."""
        active = self._active
        if active is not None and active.tell() > 0 and active.tell() + size > self._segment_bytes:
            self._close_active()
            active = None
        if active is None:
            self._active_path = self.directory / f"{_PREFIX}{self._next:020d}{_SUFFIX}"
            self._next += 1
            active = self._active = self._active_path.open("ab")
            if self._fsync == "always":  # the new file's name survives a power cut too
                _sync_directory(self.directory)
        return active

    def _sync(self, active: BinaryIO) -> None:
        """Hand the writes to the operating system; fsync them under ``"always"``
        (``"interval"``: ``sync_if_due``, off the writers' path)."""
        active.flush()
        if self._fsync == "always":
            os.fsync(active.fileno())

    def sync_if_due(self) -> None:
        """Under ``fsync = "interval"``: fsync the active segment if
        ``fsync_interval`` s have passed since the last time. Called
        periodically in a thread; the fsync runs without the journal's lock,
        so writers never wait for it."""
        with self._lock:
            now = time.monotonic()
            active = self._active
            if self._fsync != "interval" or active is None:
                return
            if now - self._last_sync < self._fsync_interval:
                return
            active.flush()
            fd = os.dup(active.fileno())
            self._last_sync = now
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _close_active(self) -> None:
        path = self._active_path
        if self._active is not None:
            self._active.flush()
            if self._fsync != "never":
                os.fsync(self._active.fileno())
            self._active.close()
            self._active = None
            self._active_path = None
        tally = self._tallies.get(path) if path is not None else None
        if path is not None and tally is not None and tally.settled >= tally.records:
            self._delete(path)

    def seal(self) -> list[Path]:
        """Close the active segment; return every segment, oldest first."""
        with self._lock:
            self._close_active()
            return self._segment_paths()

    def delete(self, path: Path) -> None:
        """Remove a sealed segment (once each of its records is delivered), if
        settling its last record has not removed it already."""
        with self._lock:
            if path == self._active_path:
                raise ValueError(f"{path} is the active segment")
            if path.exists():
                self._delete(path)

    def _delete(self, path: Path) -> None:
        size = path.stat().st_size
        path.unlink()
        self._bytes -= size
        self._tallies.pop(path, None)
        self._marks.pop(path, None)
        with contextlib.suppress(FileNotFoundError):
            _acked_path(path).unlink()

    def set_aside(self, path: Path) -> Path:
        """Rename a sealed segment with a bad tail to ``*.corrupt``: kept for
        inspection, no longer replayed or counted against ``max_bytes``."""
        with self._lock:
            if path == self._active_path:
                raise ValueError(f"{path} is the active segment")
            target = path.with_name(path.name + CORRUPT_SUFFIX)
            if not path.exists():  # its intact records were all settled: removed
                return target
            size = path.stat().st_size
            path.rename(target)
            self._bytes -= size
            self._tallies.pop(path, None)
            self._marks.pop(path, None)
            with contextlib.suppress(FileNotFoundError):
                _acked_path(path).unlink()
            return target

    def reject(self, records: Sequence[Encoded]) -> Path:
        """Keep records that Kafka refused for good (they are not replayed again)
        in ``rejected.log``, in the segment format, for inspection."""
        path = self.directory / "rejected.log"
        with self._lock, path.open("ab") as file:
            file.write(b"".join(_frame(record) for record in records))
            file.flush()
            if self._fsync != "never":  # before their segment is deleted
                os.fsync(file.fileno())
        return path

    def close(self) -> None:
        """Write the marks, close the active segment and release the slot, if
        this journal holds one."""
        self.flush_marks()
        with self._lock:
            self._close_active()
            if self._slot_lock is not None:
                os.close(self._slot_lock)  # releases the flock
                self._slot_lock = None

    # -- slots: one journal directory per running process ----------------------

    @classmethod
    def _try_slot(cls, slot: Path, **options: object) -> Journal | None:
        """The journal of ``slot`` with its lock held, or None if another process holds it."""
        try:
            slot.mkdir(parents=True, exist_ok=True)
            fd = os.open(slot / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise JournalError(f"spill directory {slot}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            journal = cls(slot, **options)  # type: ignore[arg-type]
        except BaseException:
            os.close(fd)
            raise
        journal._slot_lock = fd
        return journal

    @classmethod
    def claim_slot(cls, root: Path, **options: object) -> Journal:
        """The journal of the lowest-numbered slot under ``root`` no running
        process holds; its lock is held until ``close()``. Raises JournalError."""
        number = 0
        while True:
            journal = cls._try_slot(root / f"{_SLOT}{number}", **options)
            if journal is not None:
                return journal
            number += 1

    @classmethod
    def unclaimed(cls, root: Path, **options: object) -> Iterator[Journal]:
        """Each slot under ``root`` that no running process holds, locked while
        the caller uses it (e.g. to replay what a stopped process left) and
        closed when the iteration moves on."""
        if not root.is_dir():
            return
        for slot in sorted(root.glob(f"{_SLOT}*")):
            try:
                journal = cls._try_slot(slot, **options) if slot.is_dir() else None
            except JournalError as exc:  # e.g. a slot left unreadable: not ours to stop on
                _unusable_slot(logging.ERROR, str(slot), f"{exc}; skipped")
                continue
            if journal is None:
                continue
            try:
                yield journal
            finally:
                journal.close()


_unusable_slot = RateLimitedLog(log, interval=300.0)


class Placement(NamedTuple):
    """Where records written ahead of their delivery are: a journal and its segment."""

    journal: Journal
    segment: Path

    def settle(self, keys: Sequence[bytes | None]) -> None:
        """These records are acknowledged, or refused for good: never to be replayed."""
        self.journal.settle(self.segment, keys, live=True)

    def leave(self, count: int, ledger: Ledger) -> None:
        """``count`` of these records could not be delivered now: they stay in
        the journal for a replay, counted spilled (they are not written again)."""
        ledger.add_spilled(count)
        self.journal.release(self.segment, count)


class Spill:
    """Where a record goes when Kafka cannot take it: the journal, counted
    ``spilled``; past the journal's cap, ``dropped``; with no journal, or when
    the disk refuses the write, ``failed``. Thread-safe; every path is logged
    (rate-limited)."""

    def __init__(self, journal: Journal | None, ledger: Ledger) -> None:
        self.journal = journal
        self._ledger = ledger
        self._log = RateLimitedLog(log)

    def keep(
        self,
        records: Sequence[Encoded],
        why: str,
        unkept: Callable[[int, str], None] | None = None,
    ) -> int:
        """Journal ``records``; return how many were written (the first ones).

        Those not written are counted by ``unkept(count, reason)`` when given
        (their answers await them: records.durability), else as ``dropped``
        past the cap and ``failed`` without a journal or on a disk error.
        """
        count = len(records)
        if not count:
            return 0
        if self.journal is None:
            if unkept is not None:
                unkept(count, "spill disabled")
                return 0
            self._ledger.add_failed(count)
            self._log(logging.ERROR, "failed", f"{count} records lost ({why}; spill disabled)")
            return 0
        try:
            written = self.journal.append(records)
        except PartialWrite as exc:
            self._ledger.add_spilled(exc.written)
            lost = count - exc.written
            if unkept is not None:
                unkept(lost, f"cannot write the spill journal: {exc}")
                return exc.written
            self._ledger.add_failed(lost)
            self._log(
                logging.ERROR,
                "disk",
                f"{lost} records lost ({why}): cannot write the spill journal: {exc}",
            )
            return exc.written
        self._ledger.add_spilled(written)
        self._log(logging.WARNING, "spilled", f"{written} records spilled to the journal ({why})")
        if written < count:
            full = "the spill journal is full (spill.max_bytes)"
            if unkept is not None:
                unkept(count - written, full)
                return written
            self._ledger.add_dropped(count - written)
            self._log(logging.ERROR, "full", f"{count - written} records dropped: {full}")
        return written
