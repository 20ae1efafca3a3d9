"""docs/recipes.md is true: each recipe's TOML loads, and each of its
request rows gets exactly the documented answer from the rule table."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from redirect_logger.config import load_settings
from redirect_logger.rules import RuleTable

RECIPES = Path(__file__).resolve().parent.parent / "docs" / "recipes.md"
_TOML_RE = re.compile(r"```toml\n(.*?)```", re.S)
_ROW_RE = re.compile(r"^\| `([^`]+)` \| `([^`]+)` \|$", re.M)


def recipes() -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(title, TOML, [(request URL, answer)]) per "## " section with a TOML block."""
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
    ]


@pytest.mark.parametrize(("title", "toml", "rows"), recipes(), ids=lambda v: str(v)[:20])
def test_each_recipe_answers_as_documented(
    title: str, toml: str, rows: list[tuple[str, str]], tmp_path: Path
) -> None:
    path = tmp_path / "recipe.toml"
    path.write_text(toml, encoding="utf-8")
    table = RuleTable.from_settings(load_settings(path))
    answers = []
    for url, _ in rows:
        parts = urlsplit(url)
        target, remainder = table.match(unquote(parts.path), parts.netloc.encode())
        location = target.location(remainder, parts.query.encode())
        answers.append(str(target.status) if location is None else f"{target.status} {location}")
    assert answers == [answer for _, answer in rows]
