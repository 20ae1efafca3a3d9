"""A protobuf message as protobuf's canonical JSON mapping, exactly as
``json_format.MessageToDict(message, preserving_proto_field_name=True)``
makes it, about five times faster.

``json_format`` looks up each field's kind, name and conversion anew for
every value of every message; here they are looked up once per message type
and kept in a table, and ``ListFields()`` (what ``json_format`` walks) is
walked with it. The conversions are ``json_format``'s own rules for plain
messages, scalars, enums, repeated and map fields. Whatever else a type may
hold is handed to ``json_format`` itself, whole: the well-known types (but
``Timestamp`` and ``Duration``, whose JSON is their ``ToJsonString()``, as
``json_format`` writes it), extensions, and enum values with JSON options.
``tests/test_protojson.py`` compares both, byte for byte once written by
orjson, on generated messages of every kind of field.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.internal.type_checkers import ToShortestFloat
from google.protobuf.message import Message

Convert = Callable[[Any], Any]

_TO_JSON_STRING = frozenset({"google.protobuf.Timestamp", "google.protobuf.Duration"})
_INT64 = frozenset({FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64})


def _float_special(value: float) -> str | None:
    """json_format's text for an infinite or NaN float, None for a finite one."""
    if math.isinf(value):
        return "-Infinity" if value < 0.0 else "Infinity"
    if math.isnan(value):
        return "NaN"
    return None


def _double(value: float) -> Any:
    return value if value - value == 0.0 else _float_special(value)


def _float(value: float) -> Any:
    if value - value == 0.0:
        return ToShortestFloat(value)
    return _float_special(value)


def _bytes(value: bytes) -> str:
    return base64.b64encode(value).decode("utf-8")


def _to_json_string(message: Any) -> Any:
    return message.ToJsonString()


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
        if descriptor.full_name in _TO_JSON_STRING:
            self._made[descriptor] = _to_json_string
            return _to_json_string
        if not _plain(descriptor):
            self._made[descriptor] = self._whole
            return self._whole
        table: dict[FieldDescriptor, tuple[str, Convert | None]] = {}

        def convert(message: Any) -> dict[str, Any]:
            js: dict[str, Any] = {}
            for field, value in message.ListFields():
                name, function = table[field]
                js[name] = value if function is None else function(value)
            return js

        self._made[descriptor] = convert  # before the fields: a type may hold itself
        for field in descriptor.fields:
            table[field] = (field.name, self._field(field))
        return convert

    def _field(self, field: FieldDescriptor) -> Convert | None:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            return self._map(field.message_type)
        value = self._value(field)
        if not field.is_repeated:
            return value
        if value is None:
            return list
        return lambda values: [value(item) for item in values]

    def _map(self, entry: Descriptor) -> Convert:
        value = self._value(entry.fields_by_name["value"])
        bool_keys = entry.fields_by_name["key"].cpp_type == FieldDescriptor.CPPTYPE_BOOL

        def convert(mapping: Any) -> dict[str, Any]:
            js: dict[str, Any] = {}
            for key in mapping:
                text = ("true" if key else "false") if bool_keys else str(key)
                item = mapping[key]
                js[text] = item if value is None else value(item)
            return js

        return convert

    def _value(self, field: FieldDescriptor) -> Convert | None:
        """The conversion of one value of the field; None: the value as it is."""
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
        return None  # string, bool, 32-bit integers: json_format's str(), bool() or the value


def _enum(field: FieldDescriptor) -> Convert:
    enum = field.enum_type
    if enum.full_name == "google.protobuf.NullValue":
        return lambda value: None
    names = {number: value.name for number, value in enum.values_by_number.items()}
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
