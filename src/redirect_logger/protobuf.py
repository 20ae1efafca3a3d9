"""Protobuf bodies of the collect endpoint (``[collect.protobuf]``).

The schema is a FileDescriptorSet, read from ``descriptor_set`` or compiled
from ``proto_files`` with grpcio-tools' protoc when the config is read
(``load_schema``), so that a bad schema is a config error naming the key.
A request's ``Content-Type`` parameters pick the message type and the
framing (``Decoder.reader``); its body becomes one event per message, each
the message in protobuf's canonical JSON mapping (protojson.py), under the
limits of JSON events (docs/collect.md#protobuf-bodies).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import orjson
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from werkzeug.http import parse_options_header

from .collect import Rejected, written
from .protojson import Converter

# s protoc may take to compile proto_files at start
COMPILE_TIMEOUT = 60.0


class SchemaError(Exception):
    """The schema of ``[collect.protobuf]`` cannot be used: the key (below
    ``collect.protobuf``) and the reason."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def load_schema(descriptor_set: str, proto_files: Sequence[str], messages: Sequence[str]) -> bytes:
    """The serialized FileDescriptorSet of the schema, checked: it loads into a
    descriptor pool and holds each of ``messages``. Raises SchemaError."""
    if proto_files:
        data = _compile(proto_files)
    else:
        try:
            data = Path(descriptor_set).read_bytes()
        except OSError as exc:
            raise SchemaError(
                "descriptor_set", f"cannot read {descriptor_set!r}: {exc.strerror or exc}"
            ) from None
    _message_types(data, messages, "descriptor_set" if not proto_files else "proto_files")
    return data


def _compile(proto_files: Sequence[str]) -> bytes:
    """protoc --include_imports --descriptor_set_out, imports resolved in the
    files' own directories and among the well-known types."""
    for index, name in enumerate(proto_files):
        if not Path(name).is_file():
            raise SchemaError(f"proto_files.{index}", f"{name!r} is not a readable file")
    try:
        import grpc_tools  # noqa: F401
    except ImportError:
        raise SchemaError(
            "proto_files",
            "compiling .proto files needs grpcio-tools (pip install 'redirect-logger[protoc]'); "
            "or compile them yourself and set descriptor_set",
        ) from None
    includes = dict.fromkeys(str(Path(name).resolve().parent) for name in proto_files)
    with tempfile.TemporaryDirectory(prefix="redirect-logger-protoc-") as work:
        out = Path(work) / "schema.binpb"
        command = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            *(f"--proto_path={include}" for include in includes),
            "--include_imports",
            f"--descriptor_set_out={out}",
            *(str(Path(name).resolve()) for name in proto_files),
        ]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired:
            raise SchemaError(
                "proto_files", f"protoc took more than {COMPILE_TIMEOUT:g} s"
            ) from None
        if done.returncode != 0 or not out.is_file():
            problem = " ".join((done.stderr or done.stdout).split()) or f"exit {done.returncode}"
            raise SchemaError("proto_files", f"protoc refused them: {problem}")
        return out.read_bytes()


def _message_types(
    data: bytes, messages: Sequence[str], key: str
) -> tuple[descriptor_pool.DescriptorPool, dict[str, Descriptor]]:
    """The pool of the FileDescriptorSet ``data`` and the descriptors of
    ``messages``. Raises SchemaError naming ``key`` or a ``messages`` entry."""
    files = descriptor_pb2.FileDescriptorSet()
    try:
        files.ParseFromString(data)
    except DecodeError:
        raise SchemaError(
            key, "not a FileDescriptorSet (protoc --include_imports --descriptor_set_out=...)"
        ) from None
    if not files.file:
        raise SchemaError(key, "the FileDescriptorSet holds no file")
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        try:
            pool.Add(file)
        except Exception as exc:  # upb raises TypeError or KeyError, with its reason
            raise SchemaError(
                key,
                f"{file.name} does not load ({exc}); were its imports included "
                "(protoc --include_imports)?",
            ) from None
    found: dict[str, Descriptor] = {}
    for index, name in enumerate(messages):
        if name in found:
            raise SchemaError(f"messages.{index}", f"{name!r} is listed twice")
        try:
            found[name] = pool.FindMessageTypeByName(name)
        except KeyError:
            raise SchemaError(
                f"messages.{index}",
                f"{name!r} is not a message type of the schema (full name, with its package)",
            ) from None
    return pool, found


Read = Callable[[bytes], list[bytes]]


class _Type(NamedTuple):
    """An accepted message type: its class, the function that writes a message
    as JSON (protojson.py), and the class of ``message Batch { repeated T
    items = 1; }``, which parses a whole delimited stream in one call (None
    for a type that cannot be an item: see ``_batches``)."""

    cls: type[Message]
    convert: Callable[[Message], dict[str, Any]]
    batch: type[Message] | None


# The file of the Batch types (a name no schema of protoc's makes: it has no
# .proto suffix), in a pool of their own, so that messageType never names them
_BATCH_FILE = "redirect-logger batches"
_BATCH_PACKAGE = "redirect_logger_batches"


def _batches(
    schema: bytes, messages: Sequence[str]
) -> tuple[dict[str, Descriptor], dict[str, type[Message] | None]]:
    """A second pool of the schema, with a Batch type for each of ``messages``:
    each type's descriptor there, and its Batch class. A map's entry type
    has none (a repeated field of it is a map), nor has a MessageSet (its
    own wire format), nor any type when the pool refuses the Batch types:
    their streams are read message by message."""
    files = descriptor_pb2.FileDescriptorSet.FromString(schema)
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    descriptors = {name: pool.FindMessageTypeByName(name) for name in messages}
    batch_file = descriptor_pb2.FileDescriptorProto(
        name=_BATCH_FILE, package=_BATCH_PACKAGE, syntax="proto3"
    )
    batched: dict[str, str] = {}  # type -> its Batch type's full name
    for name, found in descriptors.items():
        options = found.GetOptions()
        if options.map_entry or options.message_set_wire_format:
            continue
        if found.file.name not in batch_file.dependency:
            batch_file.dependency.append(found.file.name)
        batch = batch_file.message_type.add(name=f"Batch{len(batched)}")
        batch.field.add(
            name="items",
            number=1,
            label=FieldDescriptor.LABEL_REPEATED,
            type=FieldDescriptor.TYPE_MESSAGE,
            type_name=f".{name}",
        )
        batched[name] = f"{_BATCH_PACKAGE}.{batch.name}"
    try:
        pool.Add(batch_file)
    except Exception:  # upb raises TypeError or KeyError; the streams are read one by one
        return descriptors, dict.fromkeys(messages)
    return descriptors, {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(batched[name]))
        if name in batched
        else None
        for name in messages
    }


class Decoder:
    """Turns protobuf bodies into events, as the JSON their records will hold."""

    def __init__(
        self, schema: bytes, messages: Sequence[str], max_events: int, max_event_bytes: int
    ) -> None:
        self._pool, _ = _message_types(schema, messages, "descriptor_set")
        self._default = messages[0]
        self._max_events = max_events
        self._max_event_bytes = max_event_bytes
        # Messages are parsed in a pool that also holds the Batch types; Any
        # types are looked up in the schema's (json_format's descriptor_pool).
        descriptors, batches = _batches(schema, messages)
        converter = Converter(self._pool)
        self._types: dict[str, _Type] = {
            name: _Type(message_factory.GetMessageClass(found), converter.of(found), batches[name])
            for name, found in descriptors.items()
        }

    def reader(self, content_type: bytes) -> Read:
        """The reader of bodies of this ``Content-Type``: its ``messageType``
        parameter (else the first of ``messages``) and ``delimited``. Raises
        Rejected (415) for a type not accepted or a ``delimited`` other than
        ``true`` or ``false``."""
        _, parameters = parse_options_header(content_type.decode("latin-1"))
        name = parameters.get("messagetype") or self._default  # names are lower-cased
        found = self._types.get(name)
        if found is None:
            in_schema = True
            try:
                self._pool.FindMessageTypeByName(name)
            except KeyError:
                in_schema = False
            why = "is not accepted here" if in_schema else "is not a message type of the schema"
            raise Rejected(
                415,
                "content_type",
                f"messageType {name!r} {why}; accepted: {', '.join(self._types)}",
                type=name,
            )
        delimited = parameters.get("delimited", "false").lower()
        if delimited not in ("true", "false"):
            raise Rejected(415, "content_type", "delimited must be true or false")
        cls, convert, batch = found
        if delimited == "true":
            return lambda body: self._delimited(body, name, cls, convert, batch)
        return lambda body: self._written([self._one(body, 0, name, cls, convert, None)])

    def _written(self, events: list[dict[str, Any]]) -> list[bytes]:
        return written(events, self._max_event_bytes)

    def _one(
        self,
        data: bytes,
        start: int,
        name: str,
        cls: type[Message],
        convert: Callable[[Message], dict[str, Any]],
        index: int | None,
    ) -> dict[str, Any]:
        """The event of one message (``data`` begins at byte ``start`` of the body)."""
        try:
            message = cls.FromString(data)
        except DecodeError:
            raise _invalid(name, index, start, _locate(cls.DESCRIPTOR, data)) from None
        try:
            return convert(message)
        except (json_format.Error, ValueError, TypeError) as exc:  # what json_format raises
            # for a message it cannot map: an invalid Timestamp, an Any of an unknown type, ...
            where = "" if index is None else f"message {index} (at byte {start}) of "
            detail: dict[str, object] = {"type": name}
            if index is not None:
                detail["event"] = index
            raise Rejected(
                400, "malformed", f"The {where}{name} has no JSON mapping: {exc}", None, **detail
            ) from None

    def _delimited(
        self,
        body: bytes,
        name: str,
        cls: type[Message],
        convert: Callable[[Message], dict[str, Any]],
        batch: type[Message] | None,
    ) -> list[bytes]:
        """The events of a delimited stream: at once (``_stream``) when every
        message in it is good; else message by message (``_each``), which
        raises Rejected for the first that is not, naming it."""
        events = None if batch is None else self._stream(body, convert, batch)
        return self._each(body, name, cls, convert) if events is None else events

    def _stream(
        self, body: bytes, convert: Callable[[Message], dict[str, Any]], batch: type[Message]
    ) -> list[bytes] | None:
        """The events of a delimited stream, parsed in one call as a Batch
        (``_items``); or None when the stream is not good in every way
        (framing, parsing, mapping, the limits), and nothing else."""
        items = self._items(body, batch)
        if items is None:
            return None
        try:
            events = [orjson.dumps(convert(item)) for item in items]
        except (json_format.Error, ValueError, TypeError):  # orjson's errors are TypeErrors
            return None
        if events and max(map(len, events)) > self._max_event_bytes:
            return None
        return events

    def _items(self, body: bytes, batch: type[Message]) -> Sequence[Message] | None:
        """The messages of a delimited stream, parsed in one call as a Batch;
        or None when its framing or a message is not good, or it holds more
        than ``max_events``.

        A stream of messages M, each after a varint of its length, becomes the
        encoding of ``Batch { repeated M items = 1; }`` once each length is
        preceded by 0x0A, field 1's tag with wire type 2 (length-delimited):
        each item then parses as ``FromString`` parses its bytes. Where the
        two could differ, the Batch is stricter (an item is one message
        deeper, so the parser's depth limit comes one message sooner), and
        the answer then comes from ``_each``."""
        pieces: list[bytes] = []
        position, end = 0, len(body)
        while position < end:
            first = body[position]
            if first < 0x80:  # a length below 128
                after = position + 1 + first
            else:
                prefix = _varint(body, position, end)
                if prefix is None:
                    return None
                after = prefix[1] + prefix[0]
            if after > end or len(pieces) == self._max_events:
                return None
            pieces.append(body[position:after])
            position = after
        if not pieces:
            return []
        try:
            items: Sequence[Message] = batch.FromString(b"\n" + b"\n".join(pieces)).items
        except DecodeError:
            return None
        return items

    def _each(
        self,
        body: bytes,
        name: str,
        cls: type[Message],
        convert: Callable[[Message], dict[str, Any]],
    ) -> list[bytes]:
        """The events of a delimited stream, read message by message; raises
        Rejected for the first message or length that is not good."""
        events: list[dict[str, Any]] = []
        position, end = 0, len(body)
        while position < end:
            index = len(events)
            if index == self._max_events:
                raise Rejected(413, "too_many_events", f"more than {self._max_events} events")
            prefix = _varint(body, position, end)
            if prefix is None:
                problem = (0, "", "its length prefix is not a valid varint")
                raise _invalid(name, index, position, problem)
            length, start = prefix
            if length > end - start:
                raise _invalid(
                    name,
                    index,
                    position,
                    (0, "", f"its length prefix says {length} bytes, {end - start} follow"),
                )
            events.append(self._one(body[start : start + length], start, name, cls, convert, index))
            position = start + length
        return self._written(events)


# Messages within messages the parser takes (upb's default depth limit, less one)
MAX_NESTING = 100

Problem = tuple[int | None, str, str]  # offset in the message, field path, what is wrong


def _invalid(name: str, index: int | None, start: int, problem: Problem) -> Rejected:
    """400 naming the type, the byte (of the body) and the field where it can."""
    offset, field, what = problem
    detail: dict[str, object] = {"type": name}
    where = ""
    if index is not None:
        detail["event"] = index
        where = f"message {index} (at byte {start}) "
    text = f"{where}is not a valid {name}"
    if offset is not None:
        detail["offset"] = start + offset
        text += f": at byte {start + offset}"
    if field:
        detail["field"] = field
        text += f", field {field}"
    text += f": {what}"
    return Rejected(400, "malformed", text[0].upper() + text[1:], None, **detail)


def _short(path: str) -> str:
    """A field path of at most 8 names: the first and the last 6."""
    names = path.split(".")
    return path if len(names) <= 8 else ".".join([names[0], "…", *names[-6:]])


def _varint(data: bytes, position: int, end: int) -> tuple[int, int] | None:
    """The varint at ``position`` and the position after it; None when it is
    cut off by ``end`` or longer than 10 bytes."""
    result = shift = 0
    while position < end and shift < 70:
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
        shift += 7
    return None


_FIXED = {1: 8, 5: 4}
_PACKED_SIZES = {
    FieldDescriptor.TYPE_FIXED64: 8,
    FieldDescriptor.TYPE_SFIXED64: 8,
    FieldDescriptor.TYPE_DOUBLE: 8,
    FieldDescriptor.TYPE_FIXED32: 4,
    FieldDescriptor.TYPE_SFIXED32: 4,
    FieldDescriptor.TYPE_FLOAT: 4,
}
_PACKED_VARINTS = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_BOOL,
        FieldDescriptor.TYPE_ENUM,
    }
)


def _locate(descriptor: Descriptor, data: bytes) -> Problem:
    """Where and why a message the parser refused does not parse, as far as
    a walk of its wire format finds; else only that it does not."""
    found = _walk(descriptor, data, 0, len(data), "", 0)
    return found if found is not None else (None, "", "it does not parse as that type")


def _walk(
    descriptor: Descriptor | None, data: bytes, position: int, end: int, path: str, depth: int
) -> Problem | None:
    """The first problem in the fields of ``data[position:end]``, or None. An
    end-group tag ends the walk of a group (``depth`` > 0 and the caller's)."""
    if depth >= MAX_NESTING:
        return position, _short(path), f"messages nested {MAX_NESTING} deep (the parser's limit)"
    while position < end:
        tag_at = position
        tag = _varint(data, position, end)
        if tag is None:
            return tag_at, path, "a field's tag is not a valid varint"
        key, position = tag
        number, wire = key >> 3, key & 7
        field = None if descriptor is None else descriptor.fields_by_number.get(number)
        name = f"{path}.{field.name}" if path and field else (field.name if field else path)
        if number == 0:
            return tag_at, path, "field number 0"
        if wire == 0:
            value = _varint(data, position, end)
            if value is None:
                return tag_at, name, "a varint value is not valid"
            position = value[1]
        elif wire in _FIXED:
            if end - position < _FIXED[wire]:
                size = _FIXED[wire]
                return tag_at, name, f"a fixed-size value of {size} bytes, {end - position} left"
            position += _FIXED[wire]
        elif wire == 2:
            length = _varint(data, position, end)
            if length is None:
                return tag_at, name, "a length is not a valid varint"
            size, position = length
            if size > end - position:
                return tag_at, name, f"a length of {size} bytes, {end - position} left"
            problem = _payload(field, data, position, position + size, name, depth)
            if problem is not None:
                return problem
            position += size
        elif wire == 3:
            inner = None if field is None else field.message_type
            problem = _walk(inner, data, position, end, name, depth + 1)
            if problem is None or problem[2] != "end of group":
                return problem or (tag_at, name, "a group without its end")
            position = problem[0] or end
        elif wire == 4:
            if depth == 0:
                return tag_at, path, "an end-group tag outside a group"
            return position, path, "end of group"
        else:
            return tag_at, name, f"wire type {wire}, which does not exist"
    return None


def _payload(
    field: FieldDescriptor | None, data: bytes, start: int, end: int, name: str, depth: int
) -> Problem | None:
    """The first problem in a length-delimited value of ``field``, or None."""
    if field is None:
        return None
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        problem = _walk(field.message_type, data, start, end, name, depth + 1)
        if problem is not None and problem[2] == "end of group":
            return start, name, "an end-group tag outside a group"
        return problem
    if field.type == FieldDescriptor.TYPE_STRING:
        try:
            data[start:end].decode("utf-8")
        except UnicodeDecodeError as exc:
            return start + exc.start, name, "a string that is not UTF-8"
        return None
    if not field.is_repeated:
        return None  # a scalar with the wrong wire type: kept as an unknown field
    if field.type in _PACKED_VARINTS:
        position = start
        while position < end:
            value = _varint(data, position, end)
            if value is None:
                return position, name, "a packed varint is not valid"
            position = value[1]
    size = _PACKED_SIZES.get(field.type)
    if size is not None and (end - start) % size:
        return start, name, f"packed values of {size} bytes in {end - start} bytes"
    return None
