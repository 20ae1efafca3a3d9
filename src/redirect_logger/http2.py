"""HTTP/2 limits on Hypercorn's connections: streams past
``server.h2_max_concurrent_streams`` refused one by one, and a connection
that resets streams faster than ``server.h2_max_resets_per_second`` closed
(GOAWAY). ``server.guard_connections`` puts ``GuardedH2Protocol`` where
Hypercorn's ``ProtocolWrapper`` looks its ``H2Protocol`` up, in both launch
modes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import trio
from h2.connection import ConnectionInputs
from h2.events import Event as H2Event
from h2.stream import StreamClosedBy
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol.h2 import H2Protocol
from hyperframe.frame import Frame, HeadersFrame, RstStreamFrame

from .limits import ConnectionGate

if TYPE_CHECKING:
    from h2._typing import Buffer


class ClosedAfterGoaway(Closed):
    """Close the connection after the GOAWAY just sent, lingering
    (``server._GuardedTCPServer``): what the client still sends is read and
    dropped for a moment first, so that the kernel does not answer it with a
    reset that could destroy the GOAWAY before the client reads it."""


class _H2Connection(h2.connection.H2Connection):
    """h2's connection, but a stream opened past the advertised
    ``SETTINGS_MAX_CONCURRENT_STREAMS`` is refused alone (RST_STREAM
    ``REFUSED_STREAM``, RFC 9113 5.1.2), where h2 ends the whole connection
    (``TooManyStreamsError``: GOAWAY ``PROTOCOL_ERROR``). Its header block is
    still decoded (HPACK's state is the connection's), but no stream is made
    for it: h2 builds a stream's state machine and validates its headers
    only to reset it, the cost a flood of streams past the limit puts on
    the Trio thread. What h2 4.4 does when it opens a stream is done here
    for a refused one: the stream id checked and recorded as the highest
    opened, and the stream recorded as closed by our reset, so that its
    later frames get RST_STREAM ``STREAM_CLOSED`` as h2 answers any reset
    stream's.

    h2 counts the open streams by walking all of them (some 8 us for 100),
    and a flood sends hundreds of new streams in a row past the limit: after
    a refusal the count is not taken again until a stream may have closed
    (any frame but HEADERS, an existing stream's HEADERS, or the end of the
    read: the app's answers, sent between reads, close streams too)."""

    refused = 0  # streams refused so far
    _limit_lifted = False
    _full = False  # the limit was reached and no stream has closed since

    @property
    def open_inbound_streams(self) -> int:
        return 0 if self._limit_lifted else super().open_inbound_streams

    def receive_data(self, data: Buffer) -> list[H2Event]:
        self._full = False
        return super().receive_data(data)

    def _receive_frame(self, frame: Frame) -> list[H2Event]:
        if not isinstance(frame, HeadersFrame):
            self._full = False
        return super()._receive_frame(frame)

    def _receive_headers_frame(self, frame: HeadersFrame) -> tuple[list[Frame], list[H2Event]]:
        limit = self.local_settings.max_concurrent_streams
        if frame.stream_id in self.streams:
            self._full = False  # its END_STREAM may close it
            return super()._receive_headers_frame(frame)
        if not self._full and self.open_inbound_streams < limit:
            return super()._receive_headers_frame(frame)
        self._full = True
        self.refused += 1
        if frame.stream_id > self.highest_inbound_stream_id and frame.stream_id % 2 == 1:
            return self._refuse(frame)
        # A stream id h2 refuses as such (too low, or even): h2 says how
        self._full = False
        self._limit_lifted = True
        try:
            frames, events = super()._receive_headers_frame(frame)
        finally:
            self._limit_lifted = False
        self.reset_stream(frame.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
        return frames, [e for e in events if getattr(e, "stream_id", None) != frame.stream_id]

    def _refuse(self, frame: HeadersFrame) -> tuple[list[Frame], list[H2Event]]:
        """RST_STREAM ``REFUSED_STREAM`` for the new stream of ``frame``,
        with no stream made for it."""
        h2.connection._decode_headers(self.decoder, frame.data)
        events = self.state_machine.process_input(ConnectionInputs.RECV_HEADERS)
        self.highest_inbound_stream_id = frame.stream_id
        self._closed_streams[frame.stream_id] = StreamClosedBy.SEND_RST_STREAM
        reset = RstStreamFrame(frame.stream_id)
        reset.error_code = h2.errors.ErrorCodes.REFUSED_STREAM
        return [reset], events


class GuardedH2Protocol(H2Protocol):
    """Hypercorn's HTTP/2 protocol for one connection, with ``_H2Connection``
    (streams past ``server.h2_max_concurrent_streams`` refused one by one),
    and a connection whose client resets streams (its own RST_STREAM, or
    streams refused) more than ``server.h2_max_resets_per_second`` times in
    a second gets GOAWAY ``ENHANCE_YOUR_CALM`` and is closed: the "rapid
    reset" attack (CVE-2023-44487), where each reset stream costs the server
    a request and the client nothing.

    What h2 makes of a read (up to 64 KiB) reaches the app only once the
    whole read is decoded, and not at all if the read crosses the reset
    limit: the GOAWAY's last stream id is the last request of an earlier
    read, so the client may retry the others (RFC 9113 6.8), and a flood's
    or a rapid-reset client's write, a read of its own, costs the app
    nothing. Handing each request over as it was decoded let a flood
    connection's first 100 streams be answered before its refusals crossed
    the limit.

    Before h2 decodes a read, ``_FrameScan`` walks its frame headers (9
    bytes each): its RST_STREAM frames are the client's resets (counted
    whatever their stream's state), and the refusals it will cost are
    foreseen as its new streams past the limit, less one room for each
    reset (a stream closes within a read only by a reset or an answer,
    and the scan counts as if every open stream were answered). A read
    that crosses the limit on that count gets the GOAWAY undecoded: a
    stream opened and reset costs h2 some 50 us to decode, and a
    rapid-reset or flood write crossed the limit only some 300 streams in.

    A read is otherwise handed to h2 ``SLICE`` bytes at a time, so that the
    bytes after a refusal past the limit the scan did not foresee are not
    decoded."""

    SLICE = 4096  # bytes handed to h2 at once

    gate: ConnectionGate | None = None  # this process's (server.guard_connections)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        theirs = self.connection  # what Hypercorn 0.18 sets on its own, copied
        self.connection = self._refusing = _H2Connection(config=theirs.config)
        self.connection.DEFAULT_MAX_INBOUND_FRAME_SIZE = theirs.DEFAULT_MAX_INBOUND_FRAME_SIZE
        self.connection.local_settings = theirs.local_settings
        gate = self.gate
        assert gate is not None  # set with the guard, by server.guard_connections()
        self._gate = gate
        self._second = -math.inf  # when the current second of counting began
        self._resets = 0  # in that second
        self._refused = 0  # of the connection's refused streams, those counted
        self._last_request = 0  # the highest stream id handed to the app
        self._ended = False  # GOAWAY sent: ENHANCE_YOUR_CALM, or h2's on a protocol error
        self._read: list[H2Event] = []  # the events of the read being decoded
        self._scan = _FrameScan()

    async def handle(self, event: Event) -> None:
        if not isinstance(event, RawData):
            await super().handle(event)
            return
        if self._ended or self.closed:
            return
        data = event.data
        now = trio.current_time()
        if now - self._second >= 1.0:
            self._second, self._resets = now, 0
        resets, streams = self._scan.read(data)
        self._resets += resets
        limit = self._refusing.local_settings.max_concurrent_streams
        refusals = max(0, streams - limit - resets)  # at least, whatever closes meanwhile
        if self._resets + refusals > self._gate.limits.h2_max_resets_per_second:
            self._resets += refusals
            await self._calm()
            return
        for start in range(0, len(data), self.SLICE):
            if start:
                await trio.lowlevel.checkpoint()  # a slice's decoding is a step
            if self._ended or self.closed:
                break
            try:  # as Hypercorn's handle does with a read
                sliced = self.connection.receive_data(data[start : start + self.SLICE])
            except h2.exceptions.ProtocolError:  # h2 queued its GOAWAY
                await self._flush()
                await self.send(Closed())
                self._ended = True  # nothing more of it is decoded or handled
                break
            await self._handle_events(sliced)
        events, self._read = self._read, []
        if self._ended or self.closed:
            return
        for received in events:
            if isinstance(received, h2.events.RequestReceived):
                self._last_request = max(self._last_request, received.stream_id or 0)
        await super()._handle_events(events)

    async def _handle_events(self, events: list[H2Event]) -> None:
        """Count the streams refused in a slice (its RST_STREAM frames were
        counted by the scan), and keep its events for the end of the read
        (``handle``), or send the GOAWAY."""
        refused = self._refusing.refused - self._refused
        if refused:
            self._refused += refused
            self._resets += refused
            self._gate.streams_refused(refused)
        if self._resets <= self._gate.limits.h2_max_resets_per_second:
            self._read += events
        else:
            await self._calm()

    async def _calm(self) -> None:
        """GOAWAY ``ENHANCE_YOUR_CALM``, counted, and the connection closed."""
        self._gate.refused("h2_resets", f"{self._resets} HTTP/2 stream resets within a second")
        self._ended = True
        code = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        self.connection.close_connection(code, last_stream_id=self._last_request)
        await self._flush()
        await self.send(ClosedAfterGoaway())


_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # what a client sends first (RFC 9113 3.4)
_HEADERS, _RST_STREAM = 0x1, 0x3  # frame types


class _FrameScan:
    """The frame headers of a connection's bytes, read by their 9-byte
    headers alone (RFC 9113 4.1), read after read: a frame's header and
    payload may each be cut by a read's end. It decodes nothing; h2 checks
    the frames as it decodes them."""

    def __init__(self) -> None:
        self._preface = len(_PREFACE)  # bytes of the preface still to pass
        self._head = b""  # a frame header's first bytes, cut by a read's end
        self._payload = 0  # bytes of a frame's payload still to pass
        self._highest = 0  # the highest client stream id seen opened

    def read(self, data: bytes) -> tuple[int, int]:
        """The RST_STREAM frames in ``data``, and its HEADERS frames opening
        a new stream (an odd id above any seen)."""
        resets = streams = 0
        at = min(self._preface, len(data))
        self._preface -= at
        end = len(data)
        while at < end:
            if self._payload:
                passed = min(self._payload, end - at)
                self._payload -= passed
                at += passed
                continue
            head = self._head + data[at : at + 9 - len(self._head)]
            at += 9 - len(self._head)
            if len(head) < 9:
                self._head = head
                break
            self._head = b""
            self._payload = int.from_bytes(head[:3])
            if head[3] == _RST_STREAM:
                resets += 1
            elif head[3] == _HEADERS:
                stream = int.from_bytes(head[5:9]) & 0x7FFFFFFF
                if stream % 2 and stream > self._highest:
                    self._highest = stream
                    streams += 1
        return resets, streams
