"""docs/recipes.md is true: each recipe's TOML loads, and each of its
request rows gets exactly the documented answer from the rule table."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from redirect_logger.config import load_settings
from redirect_logger.links import answer
from redirect_logger.rules import RuleTable

RECIPES = Path(__file__).resolve().parent.parent / "docs" / "recipes.md"
_TOML_RE = re.compile(r"```toml\n(.*?)```", re.S)
# | `request` | `answer` |, or | `when` | `request` | `answer` | (the clock's time)
_ROW_RE = re.compile(r"^\|(?: `([^`]+)` \|)? `([^`]+)` \| `([^`]+)` \|$", re.M)
# The hit id of every request the recipes show (their {hit_id} macros)
HIT_ID = "019ad3c2-5c1e-7a00-8000-00000000000a"
NOW = datetime(2026, 12, 2, tzinfo=UTC)  # when a row does not say


def recipes() -> list[tuple[str, str, list[tuple[str, str, str]]]]:
    """(title, TOML, [(when, request URL, answer)]) per "## " section with a TOML block."""
    found = []
    for section in RECIPES.read_text(encoding="utf-8").split("\n## ")[1:]:
        blocks = _TOML_RE.findall(section)
        if blocks:
            assert len(blocks) == 1, "one configuration per recipe"
            found.append((section.splitlines()[0], blocks[0], _ROW_RE.findall(section)))
    return found


def test_the_page_has_its_recipes() -> None:
    assert [(title, len(rows)) for title, _, rows in recipes()] == [
        ("A link shortener on its own domains", 9),
        ("Campaign tracking with UTM forwarding", 6),
        ("Beacon tracking: send the user on, report the click in the background", 1),
        ("A time-limited campaign", 6),
        ("Email open and click tracking", 6),
    ]


@pytest.mark.parametrize(("title", "toml", "rows"), recipes(), ids=lambda v: str(v)[:20])
def test_each_recipe_answers_as_documented(
    title: str, toml: str, rows: list[tuple[str, str, str]], tmp_path: Path
) -> None:
    path = tmp_path / "recipe.toml"
    path.write_text(toml, encoding="utf-8")
    settings = load_settings(path)
    table = RuleTable.from_settings(settings)
    pixel = settings.pixel.path if settings.pixel.enabled else None
    answers = []
    for when, url, _ in rows:
        parts = urlsplit(url)
        path = unquote(parts.path)
        if path == pixel:
            answers.append("200 image/gif")  # GET: the GIF (test_links_service.py)
            continue
        now = datetime.fromisoformat(when) if when else NOW
        found = answer(
            table, path, parts.query.encode(), parts.netloc.encode(), HIT_ID, now.timestamp()
        )
        status = found.target.status
        answers.append(str(status) if found.location is None else f"{status} {found.location}")
    assert answers == [answer for _, _, answer in rows]
