"""A protobuf message as protobuf's canonical JSON mapping, exactly as
``json_format.MessageToDict(message, preserving_proto_field_name=True)``
makes it, about seven times faster (docs/benchmarks.md#collect-endpoint).

``json_format`` walks ``ListFields()`` and looks up each field's kind, name
and conversion anew for every value of every message. Here a function is
made once per message type (Python source compiled at start, from the
descriptor), one straight run of code with the fields of the messages
within it written in place: it reads each field in number order, keeps
those that ``ListFields()`` would list, and converts each by
``json_format``'s own rules for scalars (a 4-byte float's value made once,
then kept), enums, repeated and map fields, messages, and ``Timestamp``
(its ``ToJsonString()``, with the text of each minute made once).
Whatever else a type may hold is handed to ``json_format`` itself, whole:
the other well-known types (but ``Duration``: its ``ToJsonString()``),
extensions, and enum values with JSON options. ``tests/test_protojson.py``
compares both, byte for byte once written by orjson, on generated messages
of every kind of field and on random bytes that parse."""

from __future__ import annotations

import base64
import datetime
import keyword
import math
import struct
from collections.abc import Callable
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.message import Message

Convert = Callable[[Any], Any]

_TO_JSON_STRING = frozenset({"google.protobuf.Duration"})  # json_format: ToJsonString()
_INT64 = frozenset({FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64})
_FLOATS = frozenset({FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE})


def _float_special(value: float) -> str | None:
    """json_format's text for an infinite or NaN float, None for a finite one."""
    if math.isinf(value):
        return "-Infinity" if value < 0.0 else "Infinity"
    if math.isnan(value):
        return "NaN"
    return None


def _double(value: float) -> Any:
    return value if value - value == 0.0 else _float_special(value)


_FOUR_BYTES = struct.Struct("<f")
_G = tuple(f"%.{precision}g" for precision in range(6, 18))
# 4-byte floats already written (not 0): sensors repeat their values
_WRITTEN: dict[float, float] = {}
_WRITTEN_HELD = 16384


def _shortest(value: float) -> float:
    """``type_checkers.ToShortestFloat(value)`` (what json_format writes for a
    float field), with its formats made once: the value rounded to the fewest
    significant digits, 6 or more, that read back as the same 4-byte float."""
    pack, unpack = _FOUR_BYTES.pack, _FOUR_BYTES.unpack
    for spec in _G:  # a 4-byte float needs at most 9 digits
        rounded = float(spec % value)
        # A value that 6 digits give back exactly needs no packing to tell.
        if rounded == value or unpack(pack(rounded))[0] == value:
            return rounded
    raise ValueError(f"{value!r} is not a 4-byte float")


def _float(value: float) -> Any:
    """What json_format writes for a float field's value: ``_shortest`` of a
    finite one, the text of an infinite or NaN one. The values of finite
    ones are kept (``_WRITTEN``, up to ``_WRITTEN_HELD``), but for 0 and
    -0.0, which are equal as keys."""
    if value - value == 0.0:
        found = _WRITTEN.get(value)
        if found is not None:
            return found
        found = _shortest(value)
        if value:
            if len(_WRITTEN) >= _WRITTEN_HELD:
                _WRITTEN.clear()
            _WRITTEN[value] = found
        return found
    return _float_special(value)


# Kinds whose values json_format writes as they are (str(), bool() or the int)
_AS_THEY_ARE = frozenset(
    {
        FieldDescriptor.CPPTYPE_STRING,
        FieldDescriptor.CPPTYPE_BOOL,
        FieldDescriptor.CPPTYPE_INT32,
        FieldDescriptor.CPPTYPE_UINT32,
    }
)


def _bytes(value: bytes) -> str:
    return base64.b64encode(value).decode("utf-8")


def _to_json_string(message: Any) -> Any:
    return message.ToJsonString()


_SECONDS_MIN, _SECONDS_MAX = -62135596800, 253402300799  # 0001-01-01 to 9999-12-31
_EPOCH = datetime.datetime(1970, 1, 1)
_MINUTES: dict[int, str] = {}  # minutes since the epoch -> "YYYY-MM-DDTHH:MM:"
_TWO_DIGITS = tuple(f"{second:02d}" for second in range(60))
_MILLISECONDS = tuple(f".{milliseconds:03d}Z" for milliseconds in range(1000))


def _timestamp(message: Any) -> str:
    """``message.ToJsonString()`` of a Timestamp (what json_format writes),
    with the text of each minute made once: RFC 3339 in UTC, with 0, 3, 6 or
    9 digits of a second. Raises ValueError for an invalid one, as it does."""
    seconds: int = message.seconds
    nanos: int = message.nanos
    if not (_SECONDS_MIN <= seconds <= _SECONDS_MAX and 0 <= nanos < 1_000_000_000):
        return str(message.ToJsonString())  # raises
    minutes, second = divmod(seconds, 60)
    text = _MINUTES.get(minutes)
    if text is None:
        if len(_MINUTES) >= 4096:
            _MINUTES.clear()
        # isoformat() writes the year in 4 digits, as ToJsonString() does
        text = (_EPOCH + datetime.timedelta(minutes=minutes)).isoformat()[:17]
        _MINUTES[minutes] = text
    text += _TWO_DIGITS[second]
    if not nanos:
        return text + "Z"
    milliseconds, rest = divmod(nanos, 1_000_000)
    if not rest:
        return text + _MILLISECONDS[milliseconds]
    if nanos % 1000 == 0:
        return f"{text}.{nanos // 1000:06d}Z"
    return f"{text}.{nanos:09d}Z"


class Converter:
    """Converters for the message types of one descriptor pool, made once per type."""

    def __init__(self, pool: DescriptorPool) -> None:
        self._pool = pool
        self._made: dict[Descriptor, Convert] = {}

    def of(self, descriptor: Descriptor) -> Callable[[Message], dict[str, Any]]:
        """A function that returns ``json_format.MessageToDict(message,
        preserving_proto_field_name=True, descriptor_pool=pool)`` for a message
        of this type. Where that raises, it raises too (``json_format.Error``
        or ``ValueError``, not always the same one)."""
        return self._message(descriptor)

    def _whole(self, message: Message) -> Any:
        return json_format.MessageToDict(
            message, preserving_proto_field_name=True, descriptor_pool=self._pool
        )

    def _message(self, descriptor: Descriptor) -> Convert:
        made = self._made.get(descriptor)
        if made is not None:
            return made
        if descriptor.full_name == "google.protobuf.Timestamp":
            self._made[descriptor] = _timestamp
            return _timestamp
        if descriptor.full_name in _TO_JSON_STRING:
            self._made[descriptor] = _to_json_string
            return _to_json_string
        if not _plain(descriptor):
            self._made[descriptor] = self._whole
            return self._whole
        made_later: list[Convert] = []
        # Set before the fields' converters are made: a type may hold itself.
        self._made[descriptor] = lambda message: made_later[0](message)
        convert = self._generated(descriptor)
        made_later.append(convert)
        self._made[descriptor] = convert
        return convert

    def _generated(self, descriptor: Descriptor) -> Convert:
        """A function made for the type that writes what ``ListFields()``
        would list (json_format's walk): the fields in number order, each one
        that is set. A field with presence (a message, ``optional``, a
        ``oneof`` member, proto2) is set when ``HasField`` says so; a repeated
        or map field when not empty; any other scalar when its bits are not
        all zero (upb's test): a true value, or -0.0.

        The function is one straight run of code: the fields of messages
        within it (singular or repeated, of plain types, up to ``_INLINED``
        deep and never a type within itself) are written in place, and each
        scalar's conversion with them, so that a message costs no Python call
        but for Timestamps, 4-byte floats, maps and closed enums."""
        source = _Source(self)
        source.lines.append("def convert(m):")
        source.message(descriptor, "m", "js", 1, (descriptor,))
        source.lines.append("    return js")
        text = "\n".join(source.lines) + "\n"
        exec(compile(text, f"<protojson {descriptor.full_name}>", "exec"), source.names)
        made: Convert = source.names["convert"]
        return made

    def _field(self, field: FieldDescriptor) -> Convert:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            return self._map(field.message_type)
        value = self._value(field)
        if not field.is_repeated:
            return value
        if field.cpp_type in _AS_THEY_ARE and field.type != FieldDescriptor.TYPE_BYTES:
            return list
        return lambda values: [value(item) for item in values]

    def _map(self, entry: Descriptor) -> Convert:
        value = self._value(entry.fields_by_name["value"])
        bool_keys = entry.fields_by_name["key"].cpp_type == FieldDescriptor.CPPTYPE_BOOL

        def convert(mapping: Any) -> dict[str, Any]:
            js: dict[str, Any] = {}
            for key in mapping:
                text = ("true" if key else "false") if bool_keys else str(key)
                js[text] = value(mapping[key])
            return js

        return convert

    def _value(self, field: FieldDescriptor) -> Convert:
        """The conversion of one value of the field."""
        cpp = field.cpp_type
        if cpp == FieldDescriptor.CPPTYPE_MESSAGE:
            return self._message(field.message_type)
        if cpp == FieldDescriptor.CPPTYPE_ENUM:
            return _enum(field)
        if field.type == FieldDescriptor.TYPE_BYTES:
            return _bytes
        if cpp in _INT64:
            return str
        if cpp == FieldDescriptor.CPPTYPE_DOUBLE:
            return _double
        if cpp == FieldDescriptor.CPPTYPE_FLOAT:
            return _float
        if cpp == FieldDescriptor.CPPTYPE_STRING:
            return str  # json_format's own conversions; each returns the value as it is
        if cpp == FieldDescriptor.CPPTYPE_BOOL:
            return bool
        return int  # 32-bit integers: json_format returns them as they are


def _enum_names(enum: Any) -> dict[int, str]:
    """The name json_format writes for each number of the enum: the first of aliases."""
    by_number = enum.values_by_number  # as json_format looks them up
    return {value.number: by_number[value.number].name for value in enum.values}


def _enum(field: FieldDescriptor) -> Convert:
    enum = field.enum_type
    if enum.full_name == "google.protobuf.NullValue":
        return lambda value: None
    names = _enum_names(enum)
    closed = enum.is_closed

    def convert(value: int) -> Any:
        name = names.get(value)
        if name is not None:
            return name
        if closed:
            raise json_format.SerializeToJsonError(
                "Enum field contains an integer value which can not mapped to an enum value."
            )
        return value

    return convert


# Messages within a message whose fields its function writes in place
_INLINED = 3


class _Source:
    """The source of one type's function and the names it uses (``c0``,
    ``c1``, ...: the converters it calls)."""

    def __init__(self, converter: Converter) -> None:
        self.converter = converter
        self.lines: list[str] = []
        self.names: dict[str, Any] = {
            "copysign": math.copysign,
            "special": _float_special,
            "f32": _float,
            "floats": _WRITTEN.get,
            "b64": base64.b64encode,
            "timestamp": _timestamp,
        }

    def name(self, value: Any) -> str:
        """A name the function knows ``value`` by."""
        name = f"c{len(self.names)}"
        self.names[name] = value
        return name

    def message(
        self,
        descriptor: Descriptor,
        src: str,
        dst: str,
        indent: int,
        within: tuple[Descriptor, ...],
    ) -> None:
        """Lines that set ``dst`` to the JSON of the message ``src``."""
        pad = "    " * indent
        depth = len(within)
        v = f"v{depth}"
        self.lines.append(f"{pad}{dst} = {{}}")
        has = f"h{depth}"  # the message's HasField, looked up once
        if any(f.has_presence and not f.is_repeated for f in descriptor.fields):
            self.lines.append(f"{pad}{has} = {src}.HasField")
        for field in sorted(descriptor.fields, key=lambda f: f.number):
            name = field.name
            key = repr(name)
            get = f"{src}.{name}" if not keyword.iskeyword(name) else f"getattr({src}, {key})"
            inner = field.message_type
            if inner is not None and inner.GetOptions().map_entry:
                convert = self.name(self.converter._map(inner))
                self.lines += [
                    f"{pad}{v} = {get}",
                    f"{pad}if {v}:",
                    f"{pad}    {dst}[{key}] = {convert}({v})",
                ]
            elif field.is_repeated:
                self.lines += [f"{pad}{v} = {get}", f"{pad}if {v}:"]
                if self._inline(inner, within):
                    assert inner is not None
                    item, items, out = f"s{depth}", f"l{depth}", f"d{depth}"
                    # v[:] is a list of the items: faster to walk than v
                    self.lines += [f"{pad}    {items} = []", f"{pad}    for {item} in {v}[:]:"]
                    self.message(inner, item, out, indent + 2, (*within, inner))
                    self.lines += [
                        f"{pad}        {items}.append({out})",
                        f"{pad}    {dst}[{key}] = {items}",
                    ]
                else:
                    value = self.value(field, "x")
                    written = "list(" + v + ")" if value == "x" else f"[{value} for x in {v}]"
                    self.lines.append(f"{pad}    {dst}[{key}] = {written}")
            elif field.has_presence:
                self.lines.append(f"{pad}if {has}({key}):")
                if self._inline(inner, within):
                    assert inner is not None
                    item, out = f"s{depth}", f"d{depth}"
                    self.lines.append(f"{pad}    {item} = {get}")
                    self.message(inner, item, out, indent + 1, (*within, inner))
                    self.lines.append(f"{pad}    {dst}[{key}] = {out}")
                else:
                    self.lines += [
                        f"{pad}    {v} = {get}",
                        f"{pad}    {dst}[{key}] = {self.value(field, v)}",
                    ]
            else:
                self.lines.append(f"{pad}{v} = {get}")
                if field.cpp_type in _FLOATS:
                    self.lines.append(f"{pad}if {v} or copysign(1.0, {v}) < 0.0:")
                else:
                    self.lines.append(f"{pad}if {v}:")
                self.lines.append(f"{pad}    {dst}[{key}] = {self.value(field, v)}")

    def _inline(self, descriptor: Descriptor | None, within: tuple[Descriptor, ...]) -> bool:
        """Whether the fields of a message of this type are written in place."""
        return (
            descriptor is not None
            and len(within) <= _INLINED
            and descriptor not in within
            and _plain(descriptor)
            and descriptor.full_name not in _TO_JSON_STRING
        )

    def value(self, field: FieldDescriptor, v: str) -> str:
        """The expression of one value ``v`` of the field, as json_format writes it."""
        cpp = field.cpp_type
        if cpp == FieldDescriptor.CPPTYPE_MESSAGE:
            convert = self.converter._message(field.message_type)
            if convert is _timestamp:
                return f"timestamp({v})"
            return f"{self.name(convert)}({v})"
        if cpp == FieldDescriptor.CPPTYPE_ENUM:
            enum = field.enum_type
            if enum.full_name == "google.protobuf.NullValue":
                return "None"
            if enum.is_closed:
                return f"{self.name(_enum(field))}({v})"
            return f"{self.name(_enum_names(enum))}.get({v}, {v})"
        if field.type == FieldDescriptor.TYPE_BYTES:
            return f"b64({v}).decode()"
        if cpp in _INT64:
            return f"str({v})"
        if cpp == FieldDescriptor.CPPTYPE_DOUBLE:
            return f"({v} if {v} - {v} == 0.0 else special({v}))"
        if cpp == FieldDescriptor.CPPTYPE_FLOAT:
            return f"(floats({v}) or f32({v}))"  # kept ones are not 0: true
        return v  # strings, bools and 32-bit integers: json_format writes them as they are


def _plain(descriptor: Descriptor) -> bool:
    """Whether the table converter writes this type as json_format does: not a
    well-known type, no extensions, no enum value with options (a JSON name)."""
    if descriptor.full_name.startswith("google.protobuf.") or descriptor.extension_ranges:
        return False
    for field in descriptor.fields:
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            field = entry.fields_by_name["value"]
        enum = field.enum_type
        if enum is not None and any(value.has_options for value in enum.values):
            return False
    return True
