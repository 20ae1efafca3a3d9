"""The collect endpoint: ``POST collect.path`` takes events, one record each.

The Frontend (app.py) hands it every request for ``collect.path``. It reads
the body within ``[collect]``'s limits, parses it (one JSON object, an
``{"events": [...]}`` object, or NDJSON; protobuf with ``[collect.protobuf]``,
in protobuf.py) and hands the events to the same
bounded channel as hits (``Intake.submit_all``); their records are built in
the workers. Then it answers: ``202 {"accepted": n}``, or an error that says
why (docs/collect.md).
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson
import trio

from . import decoding
from .config import MESSAGE_MAX_BYTES, NDJSON_TYPES, PROTOBUF_TYPES, CollectSettings, KafkaValue
from .hits import Hit
from .limits import HEAVY_BYTES, HeavyLane
from .pipeline import Admission

if TYPE_CHECKING:
    from .metrics import Metrics

# Deepest nesting of objects and arrays in one event (the event itself is 1):
# as deep as orjson writes. An event is written once, on the request path,
# and its record embeds those bytes, so the record never fails there.
MAX_DEPTH = 254
# Bytes of a record besides its data, at most: the text fields at their
# limits (hits.FIELD_LIMITS), each character up to 4 bytes, and the rest.
ENVELOPE_BYTES = 48 * 1024

_JSON_TYPES = frozenset({"application/json"})
_WHITESPACE = " \t\r"
_ALLOW = b"POST, OPTIONS"
# A client-made id (collect.id_field): a UUID in its 8-4-4-4-12 hex form
_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}\Z")
# A refused request's body as its "bad" record keeps it: at most the first 4 KiB
BAD_BODY_BYTES = 4096
BAD_STATUSES = frozenset({400, 413, 415})  # refused for the content (collect.bad_topic)

Headers = list[tuple[bytes, bytes]]


class Rejected(Exception):
    """A request the endpoint refuses: its status, the metric's reason and the
    JSON body ``{"error": message, **detail}``."""

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        headers: Headers | None = None,
        **detail: object,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.headers = headers or []
        self.body: dict[str, object] = {"error": message, **detail}
        self.body_read = False  # the request's body was read to its end
        self.received: bytes | None = None  # the body as read so far (its start)


def position(text: str, index: int) -> tuple[int, int]:
    """The 1-based line and column (in characters) of ``text[index]``."""
    line = text.count("\n", 0, index) + 1
    column = index - (text.rfind("\n", 0, index) + 1) + 1
    return line, column


def _malformed(message: str, line: int, column: int) -> Rejected:
    return Rejected(
        400,
        "malformed",
        f"invalid JSON at line {line}, column {column}: {message}",
        line=line,
        column=column,
    )


def parse_events(
    body: bytes, media_type: str, max_events: int, required: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """The events of a request body, in order.

    ``media_type`` picks the form: NDJSON for ``NDJSON_TYPES``, one JSON
    document for ``application/json`` and ``*+json``; for any other type,
    NDJSON when the first non-blank line is a JSON value on its own and more
    lines follow, else one document. A document is one event (an object) or
    ``{"events": [objects]}``. Raises ``Rejected`` (400 or 413), never
    anything else; a syntax error names its line and column (for NDJSON, the
    body's line).
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, column = position(*_prefix(body, exc.start))
        raise _malformed("not UTF-8", line, column) from None
    if not text.strip(_WHITESPACE + "\n"):
        raise _malformed("the body is empty", 1, 1)
    if media_type in NDJSON_TYPES:
        events = _ndjson(text, max_events)
    elif media_type in _JSON_TYPES or media_type.endswith("+json") or not _looks_like_ndjson(text):
        events = _document(text)
    else:
        events = _ndjson(text, max_events)
    if len(events) > max_events:
        raise _too_many(max_events)
    for index, event in enumerate(events):
        if not isinstance(event, dict):
            raise Rejected(400, "not_an_object", f"event {index} is not a JSON object", event=index)
        for field in required:
            if field not in event:
                raise Rejected(
                    400,
                    "missing_field",
                    f'event {index}: required field "{field}" is missing',
                    event=index,
                    field=field,
                )
    return events


def client_ids(events: list[dict[str, Any]], field: str | None) -> list[str | None] | None:
    """Each event's client-made id from ``field`` (in lower case), or None
    for an event without it; None without ``field``. Raises ``Rejected`` 400
    naming the field and the event when a value is not a UUID."""
    if field is None:
        return None
    ids: list[str | None] = []
    for index, event in enumerate(events):
        value = event.get(field)
        if value is None and field not in event:
            ids.append(None)
            continue
        if not isinstance(value, str) or not _UUID.match(value):
            raise Rejected(
                400,
                "bad_id",
                f'event {index}: field "{field}" is not a UUID',
                event=index,
                field=field,
            )
        ids.append(value.lower())
    return ids


def _prefix(body: bytes, end: int) -> tuple[str, int]:
    text = body[:end].decode("utf-8")  # valid: the first invalid byte is at ``end``
    return text, len(text)


def _too_many(max_events: int) -> Rejected:
    return Rejected(413, "too_many_events", f"more than {max_events} events")


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """The non-blank lines with their 1-based numbers."""
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip(_WHITESPACE):
            yield number, line


def _looks_like_ndjson(text: str) -> bool:
    lines = _lines(text)
    first, second = next(lines, None), next(lines, None)
    if first is None or second is None:
        return False
    try:
        orjson.loads(first[1])
    except orjson.JSONDecodeError:
        return False
    return True


def _ndjson(text: str, max_events: int) -> list[Any]:
    events: list[Any] = []
    for number, line in _lines(text):
        if len(events) == max_events:
            raise _too_many(max_events)
        try:
            events.append(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            raise _malformed(exc.msg, number, exc.pos + 1) from None
    return events


def _document(text: str) -> list[Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise _malformed(exc.msg, *position(text, exc.pos)) from None
    if not isinstance(value, dict):
        raise Rejected(
            400,
            "not_an_object",
            'the body is not a JSON object, an {"events": [...]} object or NDJSON',
        )
    if "events" not in value:
        return [value]
    events = value["events"]
    if len(value) != 1 or not isinstance(events, list):
        raise Rejected(
            400,
            "not_an_object",
            'an object with "events" must have that key alone, and an array in it',
        )
    return events


def written(events: list[dict[str, Any]], max_bytes: int) -> list[bytes]:
    """Each event as the JSON its record will hold (orjson's writing of what
    was read). Raises ``Rejected``: 400 for an event nested deeper than
    ``MAX_DEPTH``, 413 for one whose JSON is longer than ``max_bytes``."""
    found = []
    for index, event in enumerate(events):
        try:
            data = orjson.dumps(event)
        except orjson.JSONEncodeError:  # what was read can only fail on depth
            raise Rejected(
                400, "too_deep", f"event {index} is nested deeper than {MAX_DEPTH}", event=index
            ) from None
        if len(data) > max_bytes:
            raise Rejected(
                413,
                "event_too_large",
                f"event {index} is larger than {max_bytes} bytes as JSON",
                event=index,
            )
        found.append(data)
    return found


class _Gone(Exception):
    """The client went away before its body was complete."""


class Collector:
    """Answers every request for ``collect.path`` (all methods)."""

    def __init__(
        self,
        settings: CollectSettings,
        kafka: Mapping[str, KafkaValue],
        admit_all: Callable[[Sequence[Hit]], Awaitable[tuple[int, Admission]]],
        metrics: Metrics,
        lane: HeavyLane,
    ) -> None:
        self._admit_all = admit_all
        self._lane = lane
        self._max_body = settings.max_body_bytes
        self._max_events = settings.max_events
        self._types = frozenset(settings.content_types)
        self._required = tuple(settings.required_fields)
        self._body_timeout = settings.body_timeout
        self._any_origin = "*" in settings.cors_origins
        self._origins = frozenset(o.encode() for o in settings.cors_origins if o != "*")
        self._max_age = str(settings.cors_max_age).encode()
        self._rejected = metrics.collect_rejected
        self._events = metrics.collect_events
        self._encodings = frozenset(settings.encodings)
        self._id_field = settings.id_field
        self._bad = settings.bad_topic is not None  # refused bodies are recorded
        # An event's record must fit in one Kafka message.
        message_max = kafka.get("message.max.bytes", MESSAGE_MAX_BYTES)
        self._max_event = max(int(str(message_max)) - ENVELOPE_BYTES, 1)
        self._protobuf = None
        if settings.protobuf is not None:
            from .protobuf import Decoder  # it imports this module

            protobuf = settings.protobuf
            self._protobuf = Decoder(
                protobuf.loaded_schema, protobuf.messages, self._max_events, self._max_event
            )
            self._types |= PROTOBUF_TYPES

    def _allowed(self, origin: bytes) -> bool:
        return origin in self._origins or (self._any_origin and origin != b"null")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Answer the request. Never raises for what a client sends; a client
        that goes away mid-body gets no answer and nothing is recorded."""
        now = time.time()
        deadline = trio.current_time() + self._body_timeout
        origin = content_type = length = None
        for name, value in scope["headers"]:
            if name == b"origin":
                origin = value
            elif name == b"content-type":
                content_type = value
            elif name == b"content-length":
                length = value
        headers: Headers = [(b"vary", b"Origin"), (b"cache-control", b"no-store")]
        if origin is not None and origin in self._origins:  # listed: credentials too
            headers += [
                (b"access-control-allow-origin", origin),
                (b"access-control-allow-credentials", b"true"),
            ]
        elif origin is not None and self._allowed(origin):  # by "*": never credentials
            headers.append((b"access-control-allow-origin", b"*"))
        try:
            if scope["method"] == "OPTIONS":
                await self._preflight(scope, origin, headers, receive, send, deadline)
                return
            events, ids = await self._events_of(
                scope, receive, origin, content_type, length, deadline
            )
        except Rejected as rejected:
            self._rejected.labels(rejected.reason).inc()
            if self._bad and rejected.status in BAD_STATUSES:
                await self._record_bad(scope, now, rejected, receive, deadline)
            await _finish(
                scope,
                receive,
                send,
                rejected.status,
                headers + rejected.headers,
                rejected.body,
                body_read=rejected.body_read,
                deadline=deadline,
            )
            return
        except _Gone:
            return
        await self._submit(scope, now, events, headers, send, ids)

    async def _record_bad(
        self, scope: dict[str, Any], now: float, rejected: Rejected, receive: Any, deadline: float
    ) -> None:
        """Hand the "bad" record of a request refused for its content to the
        channel (collect.bad_topic): its reason, error and the start of its
        body, read now (at most ``BAD_BODY_BYTES``, by ``deadline``) if the
        refusal came before the body."""
        body = rejected.received
        if body is None:
            body, rejected.body_read = await _read_start(receive, deadline)
        content_type = encoding = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"content-encoding":
                encoding = value.decode("latin-1")
        fields = {
            "reason": rejected.reason,
            "error": rejected.body["error"],
            "content_type": content_type,
            "content_encoding": encoding,
            "body": base64.b64encode(body[:BAD_BODY_BYTES]).decode(),
        }
        bad = Hit.events_of(scope, now, rejected.status, [orjson.dumps(fields)])
        await self._admit_all(bad)

    async def _events_of(
        self,
        scope: dict[str, Any],
        receive: Any,
        origin: bytes | None,
        content_type: bytes | None,
        length: bytes | None,
        deadline: float,
    ) -> tuple[list[bytes], list[str | None] | None]:
        """The request's events, each as the JSON its record will hold, and
        their client-made ids (``client_ids``)."""
        if scope["method"] != "POST":
            raise Rejected(405, "method", "use POST", [(b"allow", _ALLOW)])
        if origin is not None and not self._allowed(origin):
            raise _forbidden()
        media_type = (
            ""
            if content_type is None
            else content_type.partition(b";")[0].strip().lower().decode("latin-1")
        )
        if media_type not in self._types:
            raise Rejected(
                415,
                "content_type",
                f"Content-Type must be one of {', '.join(sorted(self._types))}",
            )
        read = None
        if self._protobuf is not None and media_type in PROTOBUF_TYPES:
            read = self._protobuf.reader(content_type or b"")  # protobuf.py
        try:
            coding = decoding.coding_of(scope["headers"], self._encodings)
        except decoding.Refused as refused:
            raise Rejected(
                refused.status, refused.reason, str(refused), None, **refused.detail
            ) from None
        if length is not None and length.isdigit() and int(length) > self._max_body:
            raise _body_too_large(self._max_body)
        body = received = await self._read_body(receive, deadline)
        if len(received) > HEAVY_BYTES or coding is not None:  # its decoding is heavy
            await self._lane.turn()
        try:
            if coding is not None:
                try:
                    body = decoding.decoded(received, coding, self._max_body)
                except decoding.Refused as refused:
                    raise Rejected(refused.status, refused.reason, str(refused)) from None
            if read is not None:
                events_written = read(body)
                ids = None
                if self._id_field is not None:  # read back only then
                    ids = client_ids([orjson.loads(e) for e in events_written], self._id_field)
                return events_written, ids
            events = parse_events(body, media_type, self._max_events, self._required)
            return written(events, self._max_event), client_ids(events, self._id_field)
        except Rejected as rejected:
            rejected.body_read = True
            rejected.received = received[:BAD_BODY_BYTES]
            raise

    async def _read_body(self, receive: Any, deadline: float) -> bytes:
        """The whole body, at most ``max_body_bytes`` of it held at once.
        Raises Rejected (413 past the limit, 408 past the deadline) or _Gone."""
        body = bytearray()
        with trio.move_on_at(deadline):
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    raise _Gone
                body += message.get("body", b"")
                if len(body) > self._max_body:
                    rejected = _body_too_large(self._max_body)
                    rejected.received = bytes(body[:BAD_BODY_BYTES])
                    raise rejected
                if not message.get("more_body", False):
                    return bytes(body)
        raise Rejected(
            408, "body_timeout", f"the body did not arrive within {self._body_timeout:g} s"
        )

    async def _preflight(
        self,
        scope: dict[str, Any],
        origin: bytes | None,
        headers: Headers,
        receive: Any,
        send: Any,
        deadline: float,
    ) -> None:
        """A CORS preflight from an allowed origin: 204 with the Access-Control
        headers; one from any other origin: 403; OPTIONS without an origin: 204."""
        if origin is None:
            await _finish(
                scope,
                receive,
                send,
                204,
                [*headers, (b"allow", _ALLOW)],
                None,
                body_read=False,
                deadline=deadline,
            )
            return
        if not self._allowed(origin):
            raise _forbidden()
        headers = [
            (b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
            *headers[1:],
            (b"access-control-allow-methods", b"POST"),
            (b"access-control-allow-headers", b"Content-Type"),
            (b"access-control-max-age", self._max_age),
        ]
        await _finish(scope, receive, send, 204, headers, None, body_read=False, deadline=deadline)

    async def _submit(
        self,
        scope: dict[str, Any],
        now: float,
        objects: list[bytes],
        headers: Headers,
        send: Any,
        ids: list[str | None] | None = None,
    ) -> None:
        """Hand the events to the channel and answer 202, or 503 when shed
        (``accepted`` says how many are recorded all the same: under
        ``records.durability``, those made durable before the rest could not be)."""
        events = Hit.events_of(scope, now, 202, objects, ids)
        count = len(events)
        accepted, admission = await self._admit_all(events)
        if accepted:
            self._events.labels("accepted").inc(accepted)
        if admission is Admission.SHED:
            self._events.labels("shed").inc(count - accepted)
            self._rejected.labels("overloaded").inc()
            body: dict[str, object] = {"error": "overloaded, retry later", "accepted": accepted}
            await _respond(send, 503, [*headers, (b"retry-after", b"1")], body)
            return
        body = {"accepted": accepted}
        if accepted < count:
            self._events.labels("dropped").inc(count - accepted)
            body["dropped"] = count - accepted
        await _respond(send, 202, headers, body)


def _forbidden() -> Rejected:
    return Rejected(403, "origin", "this origin may not post events")


def _body_too_large(limit: int) -> Rejected:
    return Rejected(413, "body_too_large", f"the body is larger than {limit} bytes")


async def _respond(
    send: Any,
    status: int,
    headers: Headers,
    body: dict[str, object] | None,
    *,
    head: bool = False,
    more: bool = False,
) -> None:
    """Send the answer; with ``more``, the stream stays open for a last empty body."""
    content = b"" if body is None else orjson.dumps(body)
    if status != 204:  # a 204 has no Content-Length (RFC 9110, 8.6)
        headers = [*headers, (b"content-length", str(len(content)).encode())]
    if content:
        headers.append((b"content-type", b"application/json"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else content, "more_body": more})


async def _finish(
    scope: dict[str, Any],
    receive: Any,
    send: Any,
    status: int,
    headers: Headers,
    body: dict[str, object] | None,
    *,
    body_read: bool,
    deadline: float,
) -> None:
    """Answer a request whose body may not have been read (to its end).

    HTTP/1: Hypercorn closes such a connection once the answer is sent; but
    ending the answer also queues ``http.disconnect`` for this request, behind
    body chunks nobody reads, so the last send could wait forever. The rest of
    the body is received and thrown away while the answer goes out, and the
    client is told that the connection closes after an error.

    HTTP/2: Hypercorn 0.18 fails the whole connection on data for a stream
    that has ended. The answer is sent at once, but its stream is ended only
    once the rest of the body has been thrown away (or the client reset the
    stream), at the latest at ``deadline``.
    """
    head = scope["method"] == "HEAD"
    if scope.get("http_version", "1.1") == "2":
        await _respond(send, status, headers, body, head=head, more=not body_read)
        if not body_read:
            with trio.move_on_at(deadline):
                await _discard(receive)
            await send({"type": "http.response.body", "body": b""})
        return
    if status >= 400:
        headers = [*headers, (b"connection", b"close")]
    async with trio.open_nursery() as nursery:
        if not body_read:
            nursery.start_soon(_discard, receive)
        await _respond(send, status, headers, body, head=head)
        nursery.cancel_scope.cancel()


async def _read_start(receive: Any, deadline: float) -> tuple[bytes, bool]:
    """The first ``BAD_BODY_BYTES`` of a body not read yet (what arrives by
    ``deadline``), and whether that was all of it."""
    start = bytearray()
    with trio.move_on_at(deadline):
        while len(start) < BAD_BODY_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return bytes(start), True
            start += message.get("body", b"")[: BAD_BODY_BYTES - len(start)]
            if not message.get("more_body", False):
                return bytes(start), True
    return bytes(start), False


async def _discard(receive: Any) -> None:
    """Receive and drop the rest of the body, until its end or a disconnect."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
