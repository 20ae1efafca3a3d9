"""The spill journal on its own: round trip, segments, cap, torn and corrupt tails, fsync."""

from __future__ import annotations

import errno
import os
import struct
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from redirect_logger.hits import Encoded
from redirect_logger.ledger import Ledger
from redirect_logger.spill import (
    Journal,
    JournalError,
    PartialWrite,
    SegmentRead,
    Spill,
    read_segment,
)
from support import v1_frame

encoded = st.builds(
    Encoded,
    topic=st.text(min_size=1, max_size=40),
    key=st.one_of(st.none(), st.binary(max_size=40)),
    value=st.binary(max_size=300),
    timestamp_ms=st.integers(min_value=0, max_value=2**62),
    headers=st.lists(st.tuples(st.text(max_size=20), st.binary(max_size=30)), max_size=4),
)

HEADERS = [("schema-version", b"1"), ("kind", b"redirect"), ("rule", b"home")]


def records(count: int, size: int = 50) -> list[Encoded]:
    return [
        Encoded("hits", b"k%d" % n, b"v" * size + b"%d" % n, 1_700_000_000_000 + n, HEADERS)
        for n in range(count)
    ]


def read_all(journal: Journal) -> list[Encoded]:
    out: list[Encoded] = []
    for path in journal.seal():
        read = read_segment(path)
        assert read.corrupt_at is None
        out.extend(read.records)
    return out


@settings(max_examples=50)
@given(batch=st.lists(encoded, max_size=40))
def test_round_trip_in_order(
    tmp_path_factory: pytest.TempPathFactory, batch: list[Encoded]
) -> None:
    journal = Journal(tmp_path_factory.mktemp("j"), max_bytes=10**7, segment_bytes=2_000)
    assert journal.append(batch) == len(batch)
    assert read_all(journal) == batch
    assert journal.size == sum(path.stat().st_size for path in journal.seal())


def test_segments_rotate_and_reopen_continues_the_sequence(tmp_path: Path) -> None:
    journal = Journal(tmp_path, max_bytes=10**6, segment_bytes=1_000)
    assert journal.append(records(50)) == 50
    first = journal.seal()
    assert len(first) > 1
    assert all(path.stat().st_size <= 1_000 for path in first)
    journal.close()
    again = Journal(tmp_path, max_bytes=10**6, segment_bytes=1_000)
    assert again.size == sum(path.stat().st_size for path in first)
    again.append(records(1))
    assert again.seal()[-1].name > first[-1].name
    assert len(read_all(again)) == 51


def test_the_cap_stops_appends_and_reports_how_many_fit(tmp_path: Path) -> None:
    journal = Journal(tmp_path, max_bytes=1_000, segment_bytes=10_000)
    written = journal.append(records(30))
    frame = journal.size // written
    assert written == 1_000 // frame
    assert journal.size <= 1_000
    assert read_all(journal) == records(30)[:written]


def test_delete_frees_space(tmp_path: Path) -> None:
    journal = Journal(tmp_path, max_bytes=3_000, segment_bytes=1_000)
    journal.append(records(100))
    full = journal.size
    oldest = journal.seal()[0]
    freed = oldest.stat().st_size
    journal.delete(oldest)
    assert journal.size == full - freed
    assert journal.append(records(1)) == 1


@pytest.mark.parametrize("cut", [1, 5, 9, 20])
def test_a_torn_tail_keeps_everything_before_it(tmp_path: Path, cut: int) -> None:
    journal = Journal(tmp_path, max_bytes=10**6, segment_bytes=10**6)
    journal.append(records(10))
    [path] = journal.seal()
    whole = path.read_bytes()
    frame = len(whole) // 10
    path.write_bytes(whole[: 9 * frame + cut])
    read = read_segment(path)
    assert read.records == records(10)[:9]
    assert read.corrupt_at == 9 * frame


def test_a_flipped_byte_is_caught_by_the_checksum(tmp_path: Path) -> None:
    journal = Journal(tmp_path, max_bytes=10**6, segment_bytes=10**6)
    journal.append(records(10))
    [path] = journal.seal()
    data = bytearray(path.read_bytes())
    frame = len(data) // 10
    data[4 * frame + 20] ^= 0x01
    path.write_bytes(bytes(data))
    read = read_segment(path)
    assert read.records == records(10)[:4]
    assert read.corrupt_at == 4 * frame


# "always": one per append, and one of the directory for the new segment's name.
@pytest.mark.parametrize(("policy", "syncs"), [("always", 4), ("never", 0), ("interval", 0)])
def test_fsync_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str, syncs: int
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(os, "fsync", calls.append)
    journal = Journal(
        tmp_path,
        max_bytes=10**6,
        segment_bytes=10**6,
        fsync=policy,
        fsync_interval=3600,  # type: ignore[arg-type]
    )
    for _ in range(3):
        journal.append(records(2))
    assert len(calls) == syncs


def test_an_unusable_directory_is_a_journal_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(JournalError, match="spill directory"):
        Journal(blocker / "spill", max_bytes=1_000, segment_bytes=100)


def test_each_process_claims_its_own_slot_and_a_released_one_is_unclaimed(
    tmp_path: Path,
) -> None:
    options = {"max_bytes": 10**6, "segment_bytes": 10**5}
    first = Journal.claim_slot(tmp_path, **options)
    second = Journal.claim_slot(tmp_path, **options)
    assert (first.directory.name, second.directory.name) == ("slot-0", "slot-1")
    second.append(records(3))
    assert list(Journal.unclaimed(tmp_path, **options)) == []  # both held
    second.close()
    [orphan] = [(j.directory.name, j.size) for j in Journal.unclaimed(tmp_path, **options)]
    assert orphan == ("slot-1", second.size)
    again = Journal.claim_slot(tmp_path, **options)  # the lowest free slot is reused
    assert again.directory.name == "slot-1"
    assert read_all(again) == records(3)


def test_set_aside_keeps_a_bad_segment_out_of_the_count(tmp_path: Path) -> None:
    journal = Journal(tmp_path, max_bytes=10**6, segment_bytes=10**6)
    journal.append(records(4))
    [path] = journal.seal()
    kept = journal.set_aside(path)
    assert (kept.name, journal.size, journal.seal()) == (path.name + ".corrupt", 0, [])


def test_spill_counts_spilled_dropped_past_the_cap_and_failed_without_a_journal(
    tmp_path: Path,
) -> None:
    ledger = Ledger()
    headers = (6 + 14 + 1) + (6 + 4 + 8) + (6 + 4 + 4)  # per header: lengths, name, value
    frame = 12 + 18 + 4 + 2 + headers + 51  # marker..crc, fields, topic, key, headers, value
    Spill(Journal(tmp_path, max_bytes=3 * frame, segment_bytes=10**4), ledger).keep(
        records(5), "test"
    )
    Spill(None, ledger).keep(records(2), "test")
    assert (ledger.spilled, ledger.dropped, ledger.failed) == (3, 2, 2)


class _FullDisk:
    """An open segment whose next write gets 5 bytes out, then ENOSPC."""

    def __init__(self, inner: BinaryIO) -> None:
        self._inner = inner

    def write(self, data: bytes) -> int:
        self._inner.write(data[:5])
        self._inner.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_a_refused_write_counts_what_was_written_and_cuts_the_torn_frame(tmp_path: Path) -> None:
    journal = Journal(tmp_path, max_bytes=10**6, segment_bytes=10**6)
    journal.append(records(2))
    assert journal._active is not None
    journal._active = _FullDisk(journal._active)  # type: ignore[assignment]
    ledger = Ledger()
    Spill(journal, ledger).keep(records(3), "test")
    assert (ledger.spilled, ledger.failed) == (0, 3)
    [path] = journal.seal()
    assert read_segment(path) == read_segment(path).__class__(records(2), None)
    assert journal.append(records(1)) == 1  # the next write starts a fresh segment
    assert [len(read_segment(p).records) for p in journal.seal()] == [2, 1]


def test_a_set_aside_segment_is_never_overwritten_after_a_restart(tmp_path: Path) -> None:
    journal = Journal(tmp_path, max_bytes=10**6, segment_bytes=10**6)
    journal.append(records(2))
    [first] = journal.seal()
    kept = journal.set_aside(first)
    journal.close()
    again = Journal(tmp_path, max_bytes=10**6, segment_bytes=10**6)  # no live segment left
    again.append(records(3))
    [second] = again.seal()
    assert second.name != first.name
    again.set_aside(second)
    assert read_segment(kept).records == records(2)


def test_a_frame_is_laid_out_as_documented(tmp_path: Path) -> None:
    """docs/durability.md, "The journal on disk": format 2, byte for byte."""
    journal = Journal(tmp_path, max_bytes=10**6, segment_bytes=10**6)
    journal.append([Encoded("t\u00e9", b"key", b"{}", 1_700_000_000_123, [("n", b"vv")])])
    [path] = journal.seal()
    body = struct.pack(">qHiI", 1_700_000_000_123, 3, 3, 9)
    body += "t\u00e9".encode() + b"key" + struct.pack(">HI", 1, 2) + b"n" + b"vv" + b"{}"
    marked = struct.pack(">II", 0x80000002, len(body))
    assert path.read_bytes() == marked + struct.pack(">I", zlib.crc32(marked + body)) + body


def test_a_format_1_segment_is_read_with_headers_from_its_values(tmp_path: Path) -> None:
    """Segments written before messages had headers are still read and
    replayed; their records get the headers their JSON implies. Format-2
    frames after them in the same file (rejected.log appends) read as usual."""
    redirect = b'{"v":1,"id":"a","kind":"redirect","rule":"home","location":"https://t/"}'
    miss = b'{"v":1,"id":"b","kind":"miss","rule":null,"location":null}'
    older = b'{"v":1,"id":"c","rule":"docs","location":"https://d/"}'  # before "kind"
    other = b"not a record"
    path = tmp_path / "segment-00000000000000000000.log"
    path.write_bytes(
        v1_frame("hits", b"k1", redirect, 1)
        + v1_frame("hits", None, miss, 2)
        + v1_frame("other", b"", older, 3)
        + v1_frame("hits", None, other, 4)
    )
    journal = Journal(tmp_path, max_bytes=10**6, segment_bytes=10**6)
    assert journal.size == path.stat().st_size
    (tmp_path / "rejected.log").write_bytes(v1_frame("hits", b"k1", redirect, 1))
    journal.reject(records(2))  # appends format 2 after format 1
    assert read_segment(path).records == [
        Encoded("hits", b"k1", redirect, 1, HEADERS),
        Encoded(
            "hits", None, miss, 2, [("schema-version", b"1"), ("kind", b"miss"), ("rule", b"")]
        ),
        Encoded(
            "other",
            b"",
            older,
            3,
            [("schema-version", b"1"), ("kind", b"redirect"), ("rule", b"docs")],
        ),
        Encoded("hits", None, other, 4, []),
    ]
    assert read_segment(path).corrupt_at is None
    assert read_segment(tmp_path / "rejected.log") == SegmentRead(
        [Encoded("hits", b"k1", redirect, 1, HEADERS), *records(2)], None
    )


def _frame_regions() -> list[int]:
    """A byte offset in each part of a format-2 frame of ``records(1)``."""
    marker, length, crc, fields, topic, key, headers = 0, 4, 8, 12, 30, 34, 36
    return [marker, marker + 3, length, length + 3, crc, fields, topic, key, headers, -1]


@pytest.mark.parametrize("where", _frame_regions())
def test_a_flipped_bit_anywhere_in_a_frame_is_caught(tmp_path: Path, where: int) -> None:
    journal = Journal(tmp_path, max_bytes=10**6, segment_bytes=10**6)
    journal.append(records(3))
    [path] = journal.seal()
    data = bytearray(path.read_bytes())
    frame = len(data) // 3
    data[frame + where % frame] ^= 0x01
    path.write_bytes(bytes(data))
    read = read_segment(path)
    assert (read.records, read.corrupt_at) == (records(3)[:1], frame)


@pytest.mark.parametrize("where", [0, 3, 4, 8, 12, 20, -1])  # length, crc, fields, topic, value
def test_a_flipped_bit_in_a_format_1_frame_is_caught(tmp_path: Path, where: int) -> None:
    frames = [v1_frame("hits", b"k", b'{"v":1,"kind":"miss","rule":null}', n) for n in range(3)]
    data = bytearray(b"".join(frames))
    frame = len(frames[0])
    data[frame + where % frame] ^= 0x01
    path = tmp_path / "segment-00000000000000000000.log"
    path.write_bytes(bytes(data))
    read = read_segment(path)
    assert ([r.timestamp_ms for r in read.records], read.corrupt_at) == ([0], frame)


def test_a_frame_of_an_unknown_format_ends_the_intact_records(tmp_path: Path) -> None:
    """A later format (written by a newer version) is not guessed at: the
    segment's records before it are kept, the rest is its bad tail."""
    journal = Journal(tmp_path, max_bytes=10**6, segment_bytes=10**6)
    journal.append(records(2))
    [path] = journal.seal()
    data = path.read_bytes()
    frame = len(data) // 2
    body = data[frame + 12 :]
    marked = struct.pack(">II", 0x80000003, len(body))
    path.write_bytes(data[:frame] + marked + struct.pack(">I", zlib.crc32(marked + body)) + body)
    read = read_segment(path)
    assert (read.records, read.corrupt_at) == (records(1), frame)


# --- writing ahead, acknowledgement marks, settlement ---


def hit_records(count: int, first: int = 0) -> list[Encoded]:
    """Records whose values are records, so that their ids can be read."""
    return [
        Encoded("hits", None, b'{"v":2,"id":"id-%04d","path":"/"}' % n, 0, HEADERS)
        for n in range(first, first + count)
    ]


def ids(count: int, first: int = 0) -> list[bytes]:
    return [b"id-%04d" % n for n in range(first, first + count)]


def test_a_batch_written_ahead_goes_whole_into_one_segment(tmp_path: Path) -> None:
    journal = Journal(tmp_path, max_bytes=10**6, segment_bytes=300)
    first, written = journal.write_ahead(hit_records(4))
    assert written == 4
    # It would take the segment past segment_bytes: a new one starts, and takes it whole.
    second, written = journal.write_ahead(hit_records(20, 4))
    assert (written, first != second) == (20, True)
    assert [len(read_segment(p).records) for p in (first, second)] == [4, 20]
    assert second.stat().st_size > 300


def test_write_ahead_takes_what_fits_under_the_cap(tmp_path: Path) -> None:
    frame = len(
        Journal(tmp_path / "probe", max_bytes=10**6, segment_bytes=10**6)
        .write_ahead(hit_records(1))[0]
        .read_bytes()  # type: ignore[union-attr]
    )
    journal = Journal(tmp_path / "j", max_bytes=3 * frame + 1, segment_bytes=10**6)
    path, written = journal.write_ahead(hit_records(5))
    assert written == 3
    assert path is not None and [r.value for r in read_segment(path).records] == [
        r.value for r in hit_records(3)
    ]
    assert journal.write_ahead(hit_records(1, 9)) == (None, 0)


def test_a_refused_write_ahead_leaves_nothing_of_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path, max_bytes=10**6, segment_bytes=10**6)
    path, _ = journal.write_ahead(hit_records(2))
    assert path is not None
    size = path.stat().st_size
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    journal._fsync = "always"  # the write is made, its fsync fails
    with pytest.raises(PartialWrite) as caught:
        journal.write_ahead(hit_records(3, 2))
    assert caught.value.written == 0
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert path.stat().st_size == size  # cut back to before the batch
    assert [r.value for r in read_segment(path).records] == [r.value for r in hit_records(2)]


def test_settled_records_are_marked_and_a_sealed_settled_segment_is_deleted(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path, max_bytes=10**6, segment_bytes=10**6)
    path, _ = journal.write_ahead(hit_records(3))
    assert path is not None
    journal.settle(path, ids(2), live=True)
    journal.flush_marks()
    assert path.with_suffix(".acked").read_bytes() == b"id-0000\nid-0001\n"
    assert journal.settled_ids(path) == frozenset(ids(2))
    assert journal.replayable() == []  # the third record is still live
    journal.settle(path, ids(1, 2), live=True)
    assert path.exists()  # settled, but still the active segment
    journal.seal()
    assert not path.exists() and not path.with_suffix(".acked").exists()
    assert journal.size == 0


def test_released_records_are_replayable_once_none_is_live(tmp_path: Path) -> None:
    journal = Journal(tmp_path, max_bytes=10**6, segment_bytes=10**6)
    path, _ = journal.write_ahead(hit_records(4))
    assert path is not None
    journal.release(path, 1)  # undelivered: waits for a replay
    assert journal.has_replayable()  # once sealed, and its live records settled
    assert journal.replayable() == []  # sealed now; three are still with the pipeline
    later, _ = journal.write_ahead(hit_records(1, 4))
    assert later != path  # new records go to a new segment
    journal.settle(path, ids(3), live=True)
    assert journal.replayable() == [path]
    assert journal.settled_ids(path) == frozenset(ids(3))


def test_a_torn_mark_and_the_segments_of_an_earlier_process(tmp_path: Path) -> None:
    journal = Journal(tmp_path, max_bytes=10**6, segment_bytes=10**6)
    path, _ = journal.write_ahead(hit_records(3))
    assert path is not None
    journal.settle(path, ids(1), live=True)
    journal.close()  # as a kill would leave it, but for a mark cut short:
    with path.with_suffix(".acked").open("ab") as marks:
        marks.write(b"id-00")
    again = Journal(tmp_path, max_bytes=10**6, segment_bytes=10**6)
    assert again.has_replayable()
    assert again.replayable() == [path]
    assert again.settled_ids(path) == frozenset(ids(1))
    again.settle(path, ids(2, 1), live=False)  # a replay: the segment stays until deleted
    assert path.exists()
    again.delete(path)
    assert not path.exists() and not path.with_suffix(".acked").exists()
