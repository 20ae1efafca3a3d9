"""protojson.py writes exactly what json_format writes (MessageToDict with
preserving_proto_field_name, then orjson): on generated messages with every
kind of field (tests/protos/kinds.proto, legacy.proto, gps.proto), and on
random bytes that parse. Also: where the wire-format walk of protobuf.py
places the problem of a body the parser refuses."""

from __future__ import annotations

import math
import struct
from typing import Any

import orjson
import pytest
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.internal import type_checkers
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from redirect_logger.collect import Rejected
from redirect_logger.protobuf import Decoder, _locate, _message_types, load_schema
from redirect_logger.protojson import _WRITTEN, _WRITTEN_HELD, Converter, _float, _timestamp
from support import ROOT

PROTOS = ROOT / "tests" / "protos"
TYPES = ["kinds.Everything", "legacy.Reading", "legacy.Plain", "tutorial.REALTIMEGPS"]
SCHEMA = load_schema(
    "", [str(PROTOS / name) for name in ("kinds.proto", "legacy.proto", "gps.proto")], TYPES
)
POOL, DESCRIPTORS = _message_types(SCHEMA, TYPES, "proto_files")
CLASSES = {name: message_factory.GetMessageClass(found) for name, found in DESCRIPTORS.items()}
CONVERTER = Converter(POOL)
CPP = FieldDescriptor

_INTS = {
    CPP.CPPTYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    CPP.CPPTYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    CPP.CPPTYPE_UINT32: st.integers(0, 2**32 - 1),
    CPP.CPPTYPE_UINT64: st.integers(0, 2**64 - 1),
}


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    cpp = field.cpp_type
    if cpp in _INTS:
        return _INTS[cpp]
    if cpp == CPP.CPPTYPE_DOUBLE:
        return st.floats()
    if cpp == CPP.CPPTYPE_FLOAT:
        return st.floats(width=32)
    if cpp == CPP.CPPTYPE_BOOL:
        return st.booleans()
    if cpp == CPP.CPPTYPE_ENUM:
        known = st.sampled_from([value.number for value in field.enum_type.values])
        if field.enum_type.is_closed:
            return known
        return known | st.integers(-(2**31), 2**31 - 1)  # open: unknown numbers are kept
    if field.type == CPP.TYPE_BYTES:
        return st.binary(max_size=20)
    return st.text(max_size=20)


@st.composite
def messages(draw: st.DrawFn, descriptor: Descriptor, depth: int = 0) -> Message:
    """A message of the type with a random subset of its fields set."""
    message = message_factory.GetMessageClass(descriptor)()
    _fill(draw, message, depth)
    return message


def _fill(draw: st.DrawFn, message: Message, depth: int) -> None:
    descriptor = message.DESCRIPTOR
    if descriptor.full_name == "google.protobuf.Timestamp":  # valid ones mostly
        message.seconds = draw(st.integers(-62135596800, 253402300799) | _INTS[CPP.CPPTYPE_INT64])  # type: ignore[attr-defined]
        message.nanos = draw(st.integers(0, 999_999_999) | st.integers(-(2**31), 2**31 - 1))  # type: ignore[attr-defined]
        return
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
            mapping = getattr(message, field.name)
            for key in draw(st.lists(_scalar(key_field), max_size=3)):
                if value_field.message_type is not None:
                    if depth < 3:
                        mapping[key].CopyFrom(draw(messages(value_field.message_type, depth + 1)))
                else:
                    mapping[key] = draw(_scalar(value_field))
        elif entry is not None:
            if depth >= 3:
                continue
            if field.is_repeated:
                for _ in range(draw(st.integers(0, 2))):
                    getattr(message, field.name).add().CopyFrom(draw(messages(entry, depth + 1)))
            else:
                getattr(message, field.name).CopyFrom(draw(messages(entry, depth + 1)))
                if field.containing_oneof is None and draw(st.booleans()):
                    getattr(message, field.name).SetInParent()
        elif field.is_repeated:
            getattr(message, field.name).extend(draw(st.lists(_scalar(field), max_size=3)))
        else:
            setattr(message, field.name, draw(_scalar(field)))


def both(message: Message) -> tuple[Any, Any]:
    """json_format's and protojson's JSON of the message (orjson's bytes), or
    the exception's class when one raises."""
    found = []
    for convert in (
        lambda m: json_format.MessageToDict(
            m, preserving_proto_field_name=True, descriptor_pool=POOL
        ),
        CONVERTER.of(message.DESCRIPTOR),
    ):
        try:
            found.append(orjson.dumps(convert(message)))
        except Exception as exc:  # compared below: both raise, or neither
            found.append(type(exc))
    return found[0], found[1]


def same(message: Message) -> None:
    expected, got = both(message)
    if isinstance(expected, bytes) or isinstance(got, bytes):
        assert got == expected
    # else both raised: json_format and protojson may name it differently


@pytest.mark.parametrize("name", TYPES)
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(data=st.data())
def test_generated_messages_are_written_as_json_format_writes_them(
    name: str, data: st.DataObject
) -> None:
    same(data.draw(messages(DESCRIPTORS[name])))


@pytest.mark.parametrize("name", TYPES)
@settings(max_examples=150, deadline=None)
@given(body=st.binary(max_size=200))
def test_whatever_parses_is_written_as_json_format_writes_it(name: str, body: bytes) -> None:
    try:
        message = CLASSES[name].FromString(body)
    except DecodeError:
        return
    same(message)


def test_the_kinds_json_format_treats_apart() -> None:
    """Examples of each rule, so that a change in json_format shows here first."""
    everything = CLASSES["kinds.Everything"]()
    scalars = everything.scalars
    scalars.f_double, scalars.f_float = math.inf, 0.1
    scalars.f_int64, scalars.f_uint64 = -(2**63), 2**64 - 1
    scalars.f_bytes, scalars.f_color, scalars.f_aliased = b"\x00\xff", 7, 1
    scalars.o_int32 = 0
    everything.maps.m_bool[True].f_bool = True
    everything.maps.m_int64[-5] = 2
    everything.well_known.duration.seconds = 90
    everything.well_known.int64_value.value = 5
    everything.well_known.struct.update({"a": [1, "b", None]})
    everything.well_known.timestamps.add(seconds=0, nanos=1000)
    everything.children.add().child.choice_int64 = 3
    expected, got = both(everything)
    assert got == expected
    assert orjson.loads(got) == {
        "scalars": {
            "f_double": "Infinity",
            "f_float": 0.1,
            "f_int64": "-9223372036854775808",
            "f_uint64": "18446744073709551615",
            "f_bytes": "AP8=",
            "f_color": 7,
            "f_aliased": "FIRST",
            "o_int32": 0,
        },
        "maps": {"m_int64": {"-5": "GREEN"}, "m_bool": {"true": {"f_bool": True}}},
        "well_known": {
            "duration": "90s",
            "struct": {"a": [1.0, "b", None]},
            "int64_value": "5",
            "timestamps": ["1970-01-01T00:00:00.000001Z"],
        },
        "children": [{"child": {"choice_int64": "3"}}],
    }
    signed = CLASSES["kinds.Everything"]()
    signed.scalars.f_float, signed.scalars.f_double = -0.0, math.nan  # both set: not zero bits
    expected, got = both(signed)
    assert got == expected == b'{"scalars":{"f_double":"NaN","f_float":-0.0}}'
    reading = CLASSES["legacy.Reading"](level=2)
    reading.Extensions[POOL.FindExtensionByName("legacy.note")] = "n"
    expected, got = both(reading)
    assert got == expected == b'{"level":"HIGH","[legacy.note]":"n"}'


@settings(max_examples=1000, deadline=None)
@given(
    seconds=st.integers(-62135596800, 253402300799) | st.integers(-(2**63), 2**63 - 1),
    nanos=st.sampled_from([0, 1_000_000, 999_000_000, 1000, 999_999_000, 1, 999_999_999])
    | st.integers(-(2**31), 2**31 - 1),
)
@example(seconds=-62135596800, nanos=0)
@example(seconds=253402300799, nanos=999_999_999)
@example(seconds=-1, nanos=500_000_000)
def test_timestamps_are_written_as_their_to_json_string(seconds: int, nanos: int) -> None:
    timestamp = POOL.FindMessageTypeByName("google.protobuf.Timestamp")
    message = message_factory.GetMessageClass(timestamp)(seconds=seconds, nanos=nanos)
    try:
        expected: object = message.ToJsonString()
    except ValueError:
        expected = ValueError
    try:
        got: object = _timestamp(message)
    except ValueError:
        got = ValueError
    assert got == expected


# --- where a body the parser refuses goes wrong ---


@settings(max_examples=150, deadline=None)
@given(data=st.data())
@example(data=None)
def test_every_cut_the_parser_refuses_is_placed(data: st.DataObject | None) -> None:
    """For a GPS message cut short anywhere, when the parser refuses the cut,
    the walk names the byte (within the message) where it goes wrong."""
    descriptor = DESCRIPTORS["tutorial.REALTIMEGPS"]
    if data is None:
        message = CLASSES["tutorial.REALTIMEGPS"](device_id="x", sequence=300)
        message.position.latitude = 1.5
        message.satellites.add(prn=1)
    else:
        message = data.draw(messages(descriptor))
    whole = message.SerializeToString()
    for cut in range(len(whole)):
        body = whole[:cut]
        try:
            CLASSES["tutorial.REALTIMEGPS"].FromString(body)
        except DecodeError:
            offset, _, problem = _locate(descriptor, body)
            assert offset is not None and 0 <= offset < cut, (cut, problem)


def test_messages_nested_past_the_parsers_limit_are_refused_naming_it() -> None:
    """99 messages deep inside the first parse (their JSON stays within the
    depth limit of JSON events); 100 deep is a 400 that says why."""
    decoder = Decoder(SCHEMA, ["kinds.Everything"], 100, 10**6)
    read = decoder.reader(b"application/x-protobuf; MessageType=kinds.Everything")

    def nested(depth: int) -> bytes:
        message = CLASSES["kinds.Everything"]()
        inner = message
        for _ in range(depth):
            inner = inner.children.add()  # a list and an object per level in JSON
        inner.scalars.f_int32 = 1
        return message.SerializeToString()

    [event] = read(nested(99))
    assert event.startswith(b'{"children":[' * 99 + b'{"scalars":{"f_int32":1}}')
    with pytest.raises(Rejected) as info:
        read(nested(100))
    assert (info.value.status, info.value.reason) == (400, "malformed")
    path = "children.…" + ".children" * 6  # the first name and the last 6
    assert info.value.body == {
        "error": f"Is not a valid kinds.Everything: at byte 238, field {path}: "
        "messages nested 100 deep (the parser's limit)",
        "type": "kinds.Everything",
        "offset": 238,  # where the fields of the 100th message inside begin
        "field": path,
    }
    assert nested(100)[236:242] == b"\x32\x04\x0a\x02\x18\x01"  # children {scalars {f_int32: 1}}


def test_a_message_without_a_json_mapping_is_refused_saying_why() -> None:
    """json_format cannot write an invalid Timestamp, nor an Any of a type the
    schema does not hold: 400 with its reason, never a 500."""
    decoder = Decoder(SCHEMA, ["kinds.Everything"], 100, 10**6)
    read = decoder.reader(b"application/x-protobuf; delimited=true")
    good = CLASSES["kinds.Everything"]()
    good.well_known.any.type_url = "type.googleapis.com/kinds.Scalars"
    unknown = CLASSES["kinds.Everything"]()
    unknown.well_known.any.type_url = "type.googleapis.com/elsewhere.Unknown"
    invalid = CLASSES["kinds.Everything"]()
    invalid.well_known.timestamp.seconds = 10**15
    for message, reason in [
        (
            unknown,
            "Can not find message descriptor by type_url: type.googleapis.com/elsewhere.Unknown",
        ),
        (
            invalid,
            "Timestamp is not valid: Seconds 1000000000000000 must be in range "
            "[-62135596800, 253402300799].",
        ),
    ]:
        first = delimited_bytes(good)
        with pytest.raises(Rejected) as info:
            read(first + delimited_bytes(message))
        assert (info.value.status, info.value.reason) == (400, "malformed")
        assert info.value.body == {
            "error": f"The message 1 (at byte {len(first) + 1}) of kinds.Everything has no "
            f"JSON mapping: {reason}",
            "type": "kinds.Everything",
            "event": 1,
        }


def delimited_bytes(message: Message) -> bytes:
    data = message.SerializeToString()
    assert len(data) < 128
    return bytes([len(data)]) + data


def test_four_byte_floats_written_before_are_written_the_same() -> None:
    """protojson.py keeps the JSON value of each 4-byte float it writes: a
    value seen again, 0.0 after -0.0 and the reverse (equal as keys), NaN
    and the infinities, and values past the bound of what is kept are all
    written as json_format writes them."""
    four = struct.Struct("<f")
    tenth = four.unpack(four.pack(0.1))[0]
    values = [tenth, tenth, -0.0, 0.0, -0.0, math.nan, math.nan, math.inf, -math.inf, 1e-45]
    for value in values:
        message = CLASSES["kinds.Everything"]()
        message.scalars.f_float = value
        message.repeated.r_float.extend([value, -value, value])
        same(message)
    count = _WRITTEN_HELD + 100
    for n in range(count):  # distinct 4-byte floats, none 0
        value = four.unpack(four.pack(1.0 + n / count))[0]
        assert _float(value) == type_checkers.ToShortestFloat(value)
        assert 0 < len(_WRITTEN) <= _WRITTEN_HELD
