"""A delimited protobuf stream parsed in one call (protobuf.py's ``_stream``,
as a Batch) gives exactly what reading it message by message (``_each``)
gives: the same events, byte for byte; and where that refuses the stream,
the one-call parse gives up and the answer is ``_each``'s own. On generated
messages of every kind of field, random bytes, streams cut at every byte,
and the edges: an empty body, a message at the size limit, length prefixes
of 1 to 3 bytes, too many messages, messages nested to the parser's limit."""

from __future__ import annotations

from collections.abc import Callable

import orjson
import pytest
from google.protobuf import json_format
from google.protobuf.internal.encoder import _VarintBytes
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from redirect_logger.collect import Rejected
from redirect_logger.protobuf import Decoder
from test_protojson import CLASSES, DESCRIPTORS, POOL, SCHEMA, TYPES, messages

MAX_EVENTS = 20


def decoder(name: str, max_event_bytes: int = 10**6) -> Decoder:
    return Decoder(SCHEMA, [name], MAX_EVENTS, max_event_bytes)


def stream(*datas: bytes) -> bytes:
    """Each message after a varint of its length (writeDelimitedTo)."""
    return b"".join(_VarintBytes(len(data)) + data for data in datas)


def outcome(read: Callable[[], list[bytes]]) -> object:
    """The events, or the refusal's status and body."""
    try:
        return read()
    except Rejected as rejected:
        return (rejected.status, rejected.body)


def check(found: Decoder, name: str, body: bytes) -> list[bytes] | None:
    """The reader's answer is ``_each``'s, and ``_stream`` gives the same
    events whenever ``_each`` accepts the stream: it never gives up on a
    good stream (none here is nested 99 deep) and never accepts a bad one."""
    cls, convert, batch = found._types[name]
    assert batch is not None
    expected = outcome(lambda: found._each(body, name, cls, convert))
    read = found.reader(f"application/x-protobuf; messageType={name}; delimited=true".encode())
    assert outcome(lambda: read(body)) == expected
    fast = found._stream(body, convert, batch)
    if isinstance(expected, list):
        assert fast == expected
        return fast
    assert fast is None
    return None


@pytest.mark.parametrize("name", TYPES)
@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(data=st.data())
def test_streams_of_generated_messages_are_read_at_once_as_one_by_one(
    name: str, data: st.DataObject
) -> None:
    sent = data.draw(st.lists(messages(DESCRIPTORS[name]), max_size=MAX_EVENTS + 2))
    events = check(decoder(name), name, stream(*(m.SerializeToString() for m in sent)))
    if events is not None:  # and each is what json_format writes for the message read
        # (read back, not as sent: a map's entries come in the order of the wire)
        assert events == [
            orjson.dumps(
                json_format.MessageToDict(
                    CLASSES[name].FromString(m.SerializeToString()),
                    preserving_proto_field_name=True,
                    descriptor_pool=POOL,
                )
            )
            for m in sent
        ]


@pytest.mark.parametrize("name", TYPES)
@settings(max_examples=150, deadline=None)
@given(
    pieces=st.lists(st.binary(max_size=30), max_size=5),
    tail=st.binary(max_size=4),
)
def test_streams_of_random_bytes_get_the_same_answer(
    name: str, pieces: list[bytes], tail: bytes
) -> None:
    """Random messages, well framed, then random bytes: a frame cut short,
    a bad varint, or more messages."""
    check(decoder(name), name, stream(*pieces) + tail)


@settings(max_examples=100, deadline=None)
@given(body=st.binary(max_size=300))
def test_random_bodies_get_the_same_answer(body: bytes) -> None:
    check(decoder("tutorial.REALTIMEGPS"), "tutorial.REALTIMEGPS", body)


def gps_reports(count: int) -> list[Message]:
    reports = []
    for n in range(count):
        report = CLASSES["tutorial.REALTIMEGPS"](device_id=f"tracker-{n}", sequence=n, fix=n % 3)
        report.fix_time.seconds, report.fix_time.nanos = 1_790_000_000 + n, n * 1_000_000
        report.position.latitude, report.position.altitude = 52.5 + n, 34.5 + n / 10
        report.satellites.add(prn=n, snr=30.25, used=True)
        reports.append(report)
    return reports


def test_a_stream_cut_or_garbled_anywhere_gets_the_answer_of_its_first_bad_message() -> None:
    """Cut at every byte: at a message's end the messages before it are the
    events; anywhere else the answer is the 400 of the message cut. Each
    byte of a stream set to 0xFF in turn: the same answer as one by one."""
    name = "tutorial.REALTIMEGPS"
    found = decoder(name)
    body = stream(*(report.SerializeToString() for report in gps_reports(4)))
    ends = {0}
    for report in gps_reports(4):
        ends.add(max(ends) + len(stream(report.SerializeToString())))
    for cut in range(len(body) + 1):
        events = check(found, name, body[:cut])
        assert (events is not None) == (cut in ends)  # a frame cut short: refused
        if events is not None:
            assert len(events) == sorted(ends).index(cut)
    for at in range(len(body)):
        check(found, name, body[:at] + b"\xff" + body[at + 1 :])


def test_a_cut_stream_is_refused_naming_the_message_and_the_byte() -> None:
    name = "tutorial.REALTIMEGPS"
    found = decoder(name)
    read = found.reader(b"application/x-protobuf; delimited=true")
    whole = stream(*(report.SerializeToString() for report in gps_reports(3)))
    last = len(stream(*(report.SerializeToString() for report in gps_reports(2))))
    with pytest.raises(Rejected) as info:
        read(whole[:-1])
    size = len(gps_reports(3)[2].SerializeToString())
    assert (info.value.status, info.value.body) == (
        400,
        {
            "error": f"Message 2 (at byte {last}) is not a valid {name}: at byte {last}: its "
            f"length prefix says {size} bytes, {size - 1} follow",
            "type": name,
            "event": 2,
            "offset": last,
        },
    )


def test_an_empty_body_is_a_stream_of_no_events() -> None:
    found = decoder("tutorial.REALTIMEGPS")
    _, convert, batch = found._types["tutorial.REALTIMEGPS"]
    assert found._stream(b"", convert, batch) == []
    assert check(found, "tutorial.REALTIMEGPS", b"") == []


def test_length_prefixes_of_1_to_3_bytes_and_a_message_at_the_size_limit() -> None:
    """A message of 20,000 bytes (a 3-byte prefix; its unknown field is not
    in the JSON), one of a few hundred (2 bytes), one of a few dozen (1
    byte), and one whose JSON is exactly the limit: read at once. One byte
    less of limit: 413 naming that event."""
    name = "tutorial.REALTIMEGPS"
    cls = CLASSES[name]
    unknown = cls(device_id="big").SerializeToString() + b"\xa2\x06" + stream(bytes(20_000))
    medium = cls(device_id="medium", raw_nmea=bytes(300)).SerializeToString()
    small = cls(device_id="small").SerializeToString()
    limit = 1000
    at_limit = cls(device_id="x" * (limit - len(b'{"device_id":""}')))
    datas = [unknown, medium, small, at_limit.SerializeToString()]
    assert [len(_VarintBytes(len(data))) for data in datas] == [3, 2, 1, 2]
    body = stream(*datas)
    found = decoder(name, max_event_bytes=limit)
    events = check(found, name, body)
    assert events is not None
    assert events[0] == b'{"device_id":"big"}'
    assert len(events[3]) == limit
    with pytest.raises(Rejected) as info:
        decoder(name, max_event_bytes=limit - 1).reader(b"application/x-protobuf; delimited=true")(
            body
        )
    assert (info.value.status, info.value.body) == (
        413,
        {"error": f"event 3 is larger than {limit - 1} bytes as JSON", "event": 3},
    )


def test_more_messages_than_max_events_are_refused_without_parsing_them_all() -> None:
    name = "tutorial.REALTIMEGPS"
    found = decoder(name)
    _, _, batch = found._types[name]
    body = stream(*(report.SerializeToString() for report in gps_reports(MAX_EVENTS + 1)))
    assert found._items(body, batch) is None
    assert check(found, name, body) is None
    read = found.reader(b"application/x-protobuf; delimited=true")
    assert outcome(lambda: read(body)) == (413, {"error": f"more than {MAX_EVENTS} events"})


def nested(depth: int) -> bytes:
    message = CLASSES["kinds.Everything"]()
    inner = message
    for _ in range(depth):
        inner = inner.children.add()
    inner.scalars.f_int32 = 1
    return message.SerializeToString()


def test_messages_nested_to_the_parsers_limit_are_read_one_by_one() -> None:
    """In a Batch an item is one message deeper: a message nested 99 deep is
    too deep for it, but not for FromString. The stream is then read message
    by message, which accepts it; 100 deep is refused as without a stream."""
    name = "kinds.Everything"
    found = decoder(name)
    _, _, batch = found._types[name]
    read = found.reader(b"application/x-protobuf; delimited=true")
    body = stream(nested(1), nested(99))
    assert found._items(body, batch) is None
    events = read(body)
    assert len(events) == 2
    assert events[1].startswith(b'{"children":[' * 99 + b'{"scalars":{"f_int32":1}}')
    deep = nested(100)
    start = len(_VarintBytes(len(deep)))
    with pytest.raises(Rejected) as info:
        read(stream(deep))
    path = "children.…" + ".children" * 6  # the first name and the last 6
    assert (info.value.status, info.value.body) == (
        400,
        {
            "error": f"Message 0 (at byte {start}) is not a valid {name}: at byte "
            f"{start + 238}, field {path}: messages nested 100 deep (the parser's limit)",
            "type": name,
            "event": 0,
            "offset": start + 238,  # as in test_protojson: where the 100th message's fields begin
            "field": path,
        },
    )


def test_types_that_cannot_be_a_batchs_items_are_read_one_by_one() -> None:
    """A map's entry type (a repeated field of it is a map) has no Batch:
    its streams are read message by message, as json_format maps each. A
    well-known type has one."""
    entry, timestamp = "tutorial.REALTIMEGPS.LabelsEntry", "google.protobuf.Timestamp"
    found = Decoder(SCHEMA, [entry, timestamp], MAX_EVENTS, 10**6)
    assert found._types[entry].batch is None
    assert found._types[timestamp].batch is not None
    labels = CLASSES["tutorial.REALTIMEGPS"]()
    labels.labels["fleet"] = "north"
    data = labels.SerializeToString()[2:]  # the entry, after field 10's tag and length
    read = found.reader(b"application/x-protobuf; delimited=true")
    assert read(stream(data, data)) == [b'{"key":"fleet","value":"north"}'] * 2
    read = found.reader(f"application/x-protobuf; messageType={timestamp}; delimited=true".encode())
    assert read(stream(b"\x08\x01", b"")) == [b'"1970-01-01T00:00:01Z"', b'"1970-01-01T00:00:00Z"']
