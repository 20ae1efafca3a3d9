"""The rule table: match a request path, build the target URL.

Safety property: a ``Location`` always starts with the rule target's own
``scheme://host``; bytes from the request only ever land, percent-encoded,
in the path after it or in the query. Nothing from the request is reflected raw.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from .config import Fallback, RedirectsSettings, Rule, Settings

# RFC 3986 pchar minus "%": a forwarded path segment keeps its slashes and
# sub-delims; everything else (including "\", "%", CR/LF, NUL, non-ASCII) is escaped.
_PATH_SAFE = "/-._~!$&'()*+,;=:@"


@dataclass(frozen=True, slots=True)
class Target:
    """A compiled redirect (or, with ``status == 404``, no redirect at all)."""

    name: str | None  # rule name; None for the fallback
    status: int
    forward_query: bool
    forward_path: bool
    origin: str = ""  # "scheme://netloc"
    path: str = "/"
    query: bytes = b""
    fragment: str = ""
    static_location: str | None = None  # the Location when nothing is forwarded
    query_allow: frozenset[str] | None = None  # request query keys forwarded; None: all
    query_drop: frozenset[str] = frozenset()  # request query keys never forwarded
    cache_control: bytes = b""  # the redirect's Cache-Control header value

    @classmethod
    def compile(
        cls,
        name: str | None,
        spec: Rule | Fallback,
        redirects: RedirectsSettings | None = None,
    ) -> Target:
        if spec.target is None:
            return cls(name, spec.status, forward_query=False, forward_path=False)
        redirects = redirects or RedirectsSettings()
        cache_control = spec.cache_control
        if cache_control is None:
            permanent = spec.status in (301, 308)
            cache_control = (
                f"max-age={redirects.permanent_max_age}"
                if permanent
                else redirects.temporary_cache_control
            )
        parts = urlsplit(spec.target)
        target = cls(
            name,
            spec.status,
            spec.forward_query,
            spec.forward_path,
            origin=f"{parts.scheme}://{parts.netloc}",
            path=parts.path or "/",
            query=parts.query.encode("ascii"),
            fragment=f"#{parts.fragment}" if parts.fragment else "",
            query_allow=None if spec.query_allow is None else frozenset(spec.query_allow),
            query_drop=frozenset(
                [redirects.no_track_param] if redirects.no_track_param is not None else []
            ),
            cache_control=cache_control.encode("ascii"),
        )
        return replace(target, static_location=target._assemble(target.path, target.query))

    def location(self, remainder: str, query_string: bytes) -> str | None:
        """The Location for a request, or None when this target answers 404.

        ``remainder`` is the decoded part of the path matched by "*";
        ``query_string`` is the request's raw query bytes.
        """
        if self.static_location is None:
            return None
        forward_path = self.forward_path and remainder
        forward_query = self.forward_query and query_string
        if not forward_path and not forward_query:
            return self.static_location
        path = _join_path(self.path, remainder) if forward_path else self.path
        query = (
            merge_query(self.query, query_string, self.query_allow, self.query_drop)
            if forward_query
            else self.query
        )
        return self._assemble(path, query)

    def _assemble(self, path: str, query: bytes) -> str:
        location = self.origin + path
        if query:
            location += "?" + query.decode("ascii")
        return location + self.fragment


def _join_path(base: str, remainder: str) -> str:
    """``base`` + the percent-encoded remainder, which cannot climb above ``base``.

    Dot segments are resolved within the remainder ("a/../b" is "b"; a ".."
    with nothing left to remove is dropped), since browsers resolve "..", and
    its encoded forms, in a Location.
    """
    segments: list[str] = []
    for segment in remainder.split("/"):
        if segment == "..":
            if segments and segments[-1]:
                segments.pop()
        elif segment != ".":
            segments.append(segment)
    if remainder.startswith("/") and (not segments or segments[0]):
        segments.insert(0, "")
    encoded = quote("/".join(segments), safe=_PATH_SAFE)
    if base.endswith("/"):
        return base + encoded.lstrip("/") if encoded.startswith("/") else base + encoded
    return base + encoded if encoded.startswith("/") else f"{base}/{encoded}"


def merge_query(
    target_query: bytes,
    request_query: bytes,
    allow: frozenset[str] | None = None,
    drop: frozenset[str] = frozenset(),
) -> bytes:
    """Merge a request's query into a target's; the request wins per key.

    Keys of the target that the request does not set keep their values and
    order; then come the request's pairs in their order (only the keys in
    ``allow``, when given, and never those in ``drop``, compared on their
    decoded text). Bytes are kept
    as they are (latin-1 maps each byte to one character and back) and the
    result is percent-encoded ASCII whatever the request held.
    """
    request_pairs = query_pairs(request_query)
    if allow is not None:
        request_pairs = [pair for pair in request_pairs if pair[0] in allow]
    if drop:
        request_pairs = [pair for pair in request_pairs if pair[0] not in drop]
    overridden = {key for key, _ in request_pairs}
    pairs = [pair for pair in query_pairs(target_query) if pair[0] not in overridden]
    pairs.extend(request_pairs)
    return urlencode(pairs, quote_via=quote, safe="", encoding="latin-1").encode("ascii")


def query_pairs(query: bytes) -> list[tuple[str, str]]:
    """A raw query's (key, value) pairs, decoded byte for byte (latin-1)."""
    return parse_qsl(query.decode("latin-1"), keep_blank_values=True, encoding="latin-1")


class RuleTable:
    """Exact paths first, then the longest matching prefix, then the fallback."""

    def __init__(
        self, rules: list[Rule], fallback: Fallback, redirects: RedirectsSettings | None = None
    ) -> None:
        self._exact: dict[str, Target] = {}
        prefixes: list[tuple[str, Target]] = []
        for rule in rules:
            target = Target.compile(rule.name, rule, redirects)
            if rule.path.endswith("/*"):
                prefix = rule.path[:-1]  # keeps the trailing "/"
                prefixes.append((prefix, target))
                # "/docs/*" also answers "/docs" itself, unless an exact rule does.
                self._exact.setdefault(prefix[:-1] or "/", target)
            else:
                self._exact[rule.path] = target
        self._prefixes = sorted(prefixes, key=lambda item: len(item[0]), reverse=True)
        self.fallback = Target.compile(None, fallback, redirects)

    @classmethod
    def from_settings(cls, settings: Settings) -> RuleTable:
        return cls(settings.rules, settings.fallback, settings.redirects)

    def match(self, path: str) -> tuple[Target, str]:
        """The target for a decoded request path and the part matched by "*"."""
        target = self._exact.get(path)
        if target is not None:
            return target, ""
        for prefix, target in self._prefixes:
            if path.startswith(prefix):
                return target, path[len(prefix) :]
        return self.fallback, path if self.fallback.forward_path else ""
