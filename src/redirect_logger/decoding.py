"""Compressed collect bodies: ``Content-Encoding`` gzip, deflate and zstd.

The body as sent is read first, within ``collect.max_body_bytes``; it is then
decompressed piece by piece, never more than the limit (and one piece) at a
time, so a decompression bomb is refused with 413 having used at most about
``max_body_bytes`` of memory (docs/collect.md#compressed-bodies).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Collection
from typing import Protocol

from backports import zstd

# The largest zstd window a frame may ask for (8 MiB): what a decoder
# allocates follows from it, whatever the frame's content.
ZSTD_WINDOW_LOG_MAX = 23
_IDENTITY = "identity"


class Refused(Exception):
    """A body refused for its coding: the answer's status, the metric's
    reason, and what the error body adds to the message."""

    def __init__(self, status: int, reason: str, message: str, **detail: object) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.detail = detail


class _Decompressor(Protocol):
    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes, max_length: int = ..., /) -> bytes: ...


def coding_of(headers: list[tuple[bytes, bytes]], accepted: Collection[str]) -> str | None:
    """The request's content coding: None for none (or ``identity``), else
    one of ``accepted``. Raises ``Refused`` 415 naming any other coding,
    and for more than one."""
    values = [value for name, value in headers if name == b"content-encoding"]
    codings = [
        coding.strip().lower()
        for coding in b",".join(values).decode("latin-1").split(",")
        if coding.strip() and coding.strip().lower() != _IDENTITY
    ]
    if not codings:
        return None
    if len(codings) > 1:
        raise Refused(415, "encoding", f"one Content-Encoding at most, not {', '.join(codings)}")
    coding = codings[0]
    if coding not in accepted:
        allowed = ", ".join(sorted(accepted)) or "none"
        raise Refused(
            415,
            "encoding",
            f"Content-Encoding {coding} is not accepted (accepted: {allowed})",
            encoding=coding,
        )
    return coding


def decoded(body: bytes, coding: str, limit: int) -> bytes:
    """``body`` decompressed by ``coding`` (gzip, deflate or zstd; several
    gzip members or zstd frames one after the other are one body). Holds at
    most ``limit`` + 1 bytes of output. Raises ``Refused``: 413 past
    ``limit`` bytes, 400 for a stream that is corrupt or ends early."""
    try:
        if coding == "zstd":
            return _inflate(body, limit, coding, _zstd)
        if coding == "gzip":
            return _inflate(body, limit, coding, lambda: zlib.decompressobj(16 + zlib.MAX_WBITS))
        # deflate is the zlib format (RFC 9110, 8.4.1.2); some clients send
        # raw deflate, which never starts with a zlib header.
        wbits = zlib.MAX_WBITS if _zlib_header(body) else -zlib.MAX_WBITS
        return _inflate(body, limit, coding, lambda: zlib.decompressobj(wbits))
    except (zlib.error, zstd.ZstdError) as exc:
        raise _undecodable(coding, str(exc)) from None


def _zstd() -> zstd.ZstdDecompressor:
    return zstd.ZstdDecompressor(
        options={zstd.DecompressionParameter.window_log_max: ZSTD_WINDOW_LOG_MAX}
    )


def _zlib_header(body: bytes) -> bool:
    return len(body) >= 2 and body[0] & 0x0F == 8 and (body[0] << 8 | body[1]) % 31 == 0


def _inflate(data: bytes, limit: int, coding: str, new: Callable[[], _Decompressor]) -> bytes:
    """Decompress member after member, asking each call for no more than the
    room left (plus one byte, to tell a body over the limit)."""
    out = bytearray()
    while True:
        decompressor: _Decompressor = new()
        while True:
            out += decompressor.decompress(data, limit - len(out) + 1)
            if len(out) > limit:
                raise Refused(
                    413,
                    "body_too_large",
                    f"the body is larger than {limit} bytes decompressed",
                )
            data = getattr(decompressor, "unconsumed_tail", b"")  # zlib keeps its own
            if decompressor.eof:
                break
            if not data and _needs_input(decompressor):
                raise _undecodable(coding, "the compressed stream ends early")
        data = decompressor.unused_data
        if not data:
            return bytes(out)


def _needs_input(decompressor: _Decompressor) -> bool:
    """Whether the decompressor has produced all it can from what it was given."""
    needs = getattr(decompressor, "needs_input", None)  # zstd's; zlib's output is all out
    return True if needs is None else bool(needs)


def _undecodable(coding: str, why: str) -> Refused:
    return Refused(400, "undecodable", f"the body is not valid {coding}: {why}")
