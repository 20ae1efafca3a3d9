"""The tracking pixel: ``GET pixel.path`` answers a 1x1 transparent GIF and
records one hit of kind ``"pixel"`` whose ``data`` is the request's query.

The Frontend (app.py) hands it the GET and HEAD requests for ``pixel.path``;
other methods there are hits like any other. The query's object is written
here, on the request path, as a collect event's is; the rest of the record
is built in the workers (hits.py).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

import orjson
from uuid_utils import uuid7

from .hits import FIELD_LIMITS, Hit
from .pipeline import Admission

PIXEL_METHODS = frozenset({"GET", "HEAD"})

# The smallest transparent GIF: 1x1, a two-colour table, colour 0 transparent.
GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff"
    b"!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
_QUERY_LIMIT = FIELD_LIMITS["query"]


def query_object(query: bytes) -> dict[str, str | list[str]]:
    """The query as a JSON object: each key's value, or its values in order
    when it is repeated. Read as the record's ``query`` is (UTF-8, invalid
    bytes as backslash escapes, cut to its length limit), then percent-decoded
    (``+`` is a space) the same way."""
    text = query.decode("utf-8", "backslashreplace")[:_QUERY_LIMIT]
    found: dict[str, str | list[str]] = {}
    for key, value in parse_qsl(text, keep_blank_values=True, errors="backslashreplace"):
        had = found.get(key)
        if had is None:
            found[key] = value
        elif isinstance(had, list):
            had.append(value)
        else:
            found[key] = [had, value]
    return found


class Pixel:
    """Answers pixel requests: records each, then sends the GIF (or 503 when
    the hit was shed, as for any hit)."""

    def __init__(self, admit: Callable[[Hit], Awaitable[Admission]]) -> None:
        self._admit = admit

    async def __call__(self, scope: dict[str, Any], send: Any) -> None:
        now = time.time()
        hit_id = str(uuid7())
        data = orjson.dumps(query_object(scope["query_string"]))
        admission = await self._admit(Hit.from_scope(scope, hit_id, now, 200, data=data))
        headers = [(b"x-hit-id", hit_id.encode()), (b"cache-control", b"no-store")]
        if admission is Admission.SHED:
            status, body = 503, b"overloaded, retry later\n"
            headers += [(b"retry-after", b"1"), (b"content-type", b"text/plain; charset=utf-8")]
        else:
            status, body = 200, GIF
            headers.append((b"content-type", b"image/gif"))
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )
