"""docs/recipes.md is true: each recipe's TOML loads, and each of its
request rows gets exactly the documented answer from the rule table (at the
row's time, with its headers, and the route and variant its record names,
where the row gives them)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
import pytest

from redirect_logger.bots import Agents
from redirect_logger.config import RecordsSettings, ServerSettings, load_settings
from redirect_logger.links import answer
from redirect_logger.routing import Clients
from redirect_logger.rules import RuleTable

RECIPES = Path(__file__).resolve().parent.parent / "docs" / "recipes.md"
_TOML_RE = re.compile(r"```toml\n(.*?)```", re.S)
# | `request` | `answer` |, or | `when` | `request` | `answer` | (the clock's time)
_ROW_RE = re.compile(r"^\|(?: `([^`]+)` \|)? `([^`]+)` \| `([^`]+)` \|$", re.M)
# | Request | Headers | Answer | Record |: headers as code spans, one each
_ROUTED_ROW_RE = re.compile(
    r"^\| `([^`]+)` \| ((?:`[^`]+` ?)*) ?\| `([^`]+)` \| `([^`]+)` \|$", re.M
)
# The hit id of every request the recipes show (their {hit_id} macros)
HIT_ID = "019ad3c2-5c1e-7a00-8000-00000000000a"
NOW = datetime(2026, 12, 2, tzinfo=UTC)  # when a row does not say

# (when, request URL, [header lines], answer, the record's route and variant or None)
Row = tuple[str, str, list[str], str, dict[str, Any] | None]


def recipes() -> list[tuple[str, str, list[Row]]]:
    """(title, TOML, rows) per "## " section with a TOML block."""
    found = []
    for section in RECIPES.read_text(encoding="utf-8").split("\n## ")[1:]:
        blocks = _TOML_RE.findall(section)
        if blocks:
            assert len(blocks) == 1, "one configuration per recipe"
            rows: list[Row] = [
                (when, url, [], answer, None) for when, url, answer in _ROW_RE.findall(section)
            ]
            rows += [
                (
                    "",
                    url,
                    re.findall(r"`([^`]+)`", headers),
                    answer,
                    orjson.loads(f"{{{record}}}"),
                )
                for url, headers, answer, record in _ROUTED_ROW_RE.findall(section)
            ]
            found.append((section.splitlines()[0], blocks[0], rows))
    return found


def clients() -> Clients:
    return Clients(Agents(), RecordsSettings(), ServerSettings(), lambda peer, _: peer)


def scope(url: str, headers: list[str]) -> dict[str, Any]:
    parts = urlsplit(url)
    raw = [(b"host", parts.netloc.encode())]
    for line in headers:
        name, _, value = line.partition(": ")
        raw.append((name.lower().encode(), value.encode()))
    return {
        "scheme": parts.scheme,
        "path": unquote(parts.path),
        "query_string": parts.query.encode(),
        "headers": raw,
        "client": ("192.0.2.1", 40000),
    }


def test_the_page_has_its_recipes() -> None:
    assert [(title, len(rows)) for title, _, rows in recipes()] == [
        ("A link shortener on its own domains", 9),
        ("Campaign tracking with UTM forwarding", 6),
        ("Beacon tracking: send the user on, report the click in the background", 1),
        ("A time-limited campaign", 6),
        ("Email open and click tracking", 6),
        ("An app link that routes iOS and Android", 7),
        ("An A/B landing-page test", 2),
    ]


@pytest.mark.parametrize(("title", "toml", "rows"), recipes(), ids=lambda v: str(v)[:20])
def test_each_recipe_answers_as_documented(
    title: str, toml: str, rows: list[Row], tmp_path: Path
) -> None:
    path = tmp_path / "recipe.toml"
    path.write_text(toml, encoding="utf-8")
    settings = load_settings(path)
    table = RuleTable.from_settings(settings)
    pixel = settings.pixel.path if settings.pixel.enabled else None
    who = clients()
    answers = []
    for when, url, headers, _, record in rows:
        request = scope(url, headers)
        if request["path"] == pixel:
            answers.append(("200 image/gif", None))  # GET: the GIF (test_links_service.py)
            continue
        host = request["headers"][0][1]
        target, remainder = table.match(request["path"], host)
        route = variant = None
        if target.routing is not None:
            target, route, variant, _ = target.routing.choose(request, who)
            location = target.location(remainder, request["query_string"])
        else:
            now = datetime.fromisoformat(when) if when else NOW
            found = answer(
                table, request["path"], request["query_string"], host, HIT_ID, now.timestamp()
            )
            target, location = found.target, found.location
        status = target.status
        said = str(status) if location is None else f"{status} {location}"
        answers.append((said, None if record is None else {"route": route, "variant": variant}))
    assert answers == [(said, record) for _, _, _, said, record in rows]


def test_the_ab_recipes_first_visit_gets_the_documented_cookie(tmp_path: Path) -> None:
    [(_, toml, _)] = [recipe for recipe in recipes() if recipe[0] == "An A/B landing-page test"]
    section = RECIPES.read_text(encoding="utf-8").split("\n## An A/B landing-page test")[1]
    documented = re.search(r"^Set-Cookie: (.+)$", section, re.M)
    assert documented is not None
    path = tmp_path / "recipe.toml"
    path.write_text(toml, encoding="utf-8")
    table = RuleTable.from_settings(load_settings(path))
    routing = table.match("/spring")[0].routing
    assert routing is not None
    cookies = {
        routing.choose(scope("https://l.example.com/spring", []), clients())[3] for _ in range(200)
    }
    assert documented.group(1).encode() in cookies
    assert len(cookies) == 2  # one per variant
