"""The reference docs against the code: docs/configuration.md's key tables
against the pydantic models, docs/cli.md against the argparse parser, and the
README's Hypercorn line against config/example.toml, `check`'s sample output
against what it prints, and every link and anchor of the docs.

Conventions the parsers rely on (docs/configuration.md keeps them):

- a table's section is ``## `[name]``` (``## `[[rules]]``` for arrays of tables);
  its key table is the first one headed ``| Key | Type | Default | Unit | Rule |``;
- Default is a TOML value in a code span, ``required``, or ``none (…)`` for a
  key that is unset by default;
- the Rule cell's first sentence states the key's bounds or allowed values,
  if it has any: ``A to B``, ``> A``, ``≥ A``, ``≤ B``, ``A to B characters``,
  ``At most N characters``, ``At least one``, ``Not empty``, or the quoted choices of a string.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shlex
import subprocess
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from redirect_logger import config
from redirect_logger.cli import build_parser
from redirect_logger.config import KAFKA_ALIASES, KAFKA_DEFAULTS, REDIRECT_STATUSES, Settings

ROOT = Path(__file__).resolve().parent.parent
KEY_HEADER = ["Key", "Type", "Default", "Unit", "Rule"]

# Allowed values that a validator (not the type) enforces: (section, key) -> values.
VALIDATED_CHOICES: dict[tuple[str, str], set[object]] = {
    ("[[rules]]", "status"): set(REDIRECT_STATUSES),
    ("[fallback]", "status"): {404, *REDIRECT_STATUSES},
    ("[[rules]]", "expired_status"): {404, 410, *REDIRECT_STATUSES},
}
# Lengths that a validator's pattern (not the field) enforces: (section, key) -> pattern.
VALIDATED_PATTERNS = {("[records]", "topic"): config._TOPIC_RE.pattern}


def split_row(line: str) -> list[str]:
    """The cells of a markdown table row; a ``|`` inside a code span or escaped
    as ``\\|`` is text."""
    cells: list[str] = []
    cell, in_code, escaped = "", False, False
    for char in line.strip().removeprefix("|").removesuffix("|"):
        if escaped:
            cell, escaped = cell + char, False
        elif char == "\\":
            escaped = True
        elif char == "`":
            in_code = not in_code
            cell += char
        elif char == "|" and not in_code:
            cells.append(cell.strip())
            cell = ""
        else:
            cell += char
    cells.append(cell.strip())
    return cells


def tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in ``text``: rows of cells, header first, without
    the delimiter row."""
    found: list[list[list[str]]] = []
    rows: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.lstrip().startswith("|"):
            row = split_row(line)
            if not all(re.fullmatch(r":?-{3,}:?", cell) for cell in row):
                rows.append(row)
        elif rows:
            found.append(rows)
            rows = []
    return found


def sections(text: str, level: str = "## ") -> dict[str, str]:
    """The text under each heading of ``level``, by heading (without the marks)."""
    parts = re.split(rf"^{re.escape(level)}(.+)$", text, flags=re.MULTILINE)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def code_spans(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def first_sentence(text: str) -> str:
    return re.split(r"(?<=[.:])\s", text, maxsplit=1)[0]


def number(text: str) -> float:
    return float(text.replace(",", ""))


# ---------------------------------------------------------------- configuration


def subtable(field: FieldInfo) -> type[BaseModel] | None:
    """The model of a key that is a table of its own (``[collect.protobuf]``)."""
    annotation, _ = unwrap(field.annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def config_sections(
    model: type[BaseModel] = Settings, prefix: str = ""
) -> dict[str, type[BaseModel]]:
    """The model of each table of the config file, by its TOML heading; tables
    nested in a table or an array of tables too (``[collect.protobuf]``,
    ``[[rules.routes]]``)."""
    found: dict[str, type[BaseModel]] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if typing.get_origin(annotation) is list:
            [item] = typing.get_args(annotation)
            if isinstance(item, type) and issubclass(item, BaseModel):
                found[f"[[{prefix}{name}]]"] = item
                found.update(config_sections(item, f"{prefix}{name}."))
        elif (table := subtable(field)) is not None:  # optional too: [collect.protobuf]
            found[f"[{prefix}{name}]"] = table
            found.update(config_sections(table, f"{prefix}{name}."))
    return found


def documented_sections() -> dict[str, str]:
    text = (ROOT / "docs" / "configuration.md").read_text()
    return {
        title.strip("`"): body
        for title, body in sections(text).items()
        if re.fullmatch(r"`\[\[?[a-z_.]+\]?\]`", title)
    }


def key_table(section: str, body: str) -> dict[str, dict[str, str]]:
    """The rows of the section's key table, by key."""
    candidates = [table for table in tables(body) if table[0][:1] == ["Key"]]
    assert candidates, f"{section}: no key table"
    header, *rows = candidates[0]
    assert header == KEY_HEADER, f"{section}: the key table's columns are {header}"
    keyed: dict[str, dict[str, str]] = {}
    for row in rows:
        assert len(row) == len(header), f"{section}: row {row[0]} has {len(row)} cells"
        [key] = code_spans(row[0]) or [row[0]]
        assert key not in keyed, f"{section}: {key} is documented twice"
        keyed[key] = dict(zip(header, row, strict=True))
    return keyed


def unwrap(annotation: Any) -> tuple[Any, bool]:
    """The annotation without ``| None``, and whether it allowed None."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [arg for arg in args if arg is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True  # noqa: UP007
    return annotation, False


def type_name(annotation: Any) -> str:
    annotation, _ = unwrap(annotation)
    origin = typing.get_origin(annotation)
    if origin is list:
        [item] = typing.get_args(annotation)
        if isinstance(item, type) and issubclass(item, BaseModel):
            return "array of tables"
        return "array of strings"
    if origin is dict:
        return "table"
    if origin is typing.Literal:
        [kind] = {type(arg) for arg in typing.get_args(annotation)}
        annotation = kind
    names = {
        bool: "boolean",
        int: "integer",
        float: "float",
        str: "string",
        datetime.datetime: "date-time",
    }
    return names[annotation]


def model_bounds(field: FieldInfo, pattern: str | None = None) -> dict[str, float]:
    """The field's bounds, and the lengths its (or a validator's) pattern allows."""
    bounds: dict[str, float] = {}
    for item in field.metadata:
        for name in ("ge", "gt", "le", "lt", "min_length", "max_length"):
            value = getattr(item, name, None)
            if value is not None:
                bounds[name] = value
        pattern = getattr(item, "pattern", None) or pattern
    if pattern is not None and (counts := re.search(r"\{(\d+),(\d+)\}\$$", pattern)):
        bounds["min_length"], bounds["max_length"] = map(int, counts.groups())
    return bounds


def doc_bounds(rule: str) -> dict[str, float]:
    """The bounds the Rule cell's first sentence states."""
    sentence = first_sentence(rule)
    num = r"(-?\d[\d,]*(?:\.\d+)?)"
    bounds: dict[str, float] = {}
    if match := re.match(rf"{num} to {num} characters", sentence):
        bounds["min_length"], bounds["max_length"] = map(number, match.groups())
        return bounds
    if re.match(r"(At least one|Not empty)\b", sentence):
        return {"min_length": 1}
    if match := re.match(rf"At most {num} characters", sentence):
        return {"max_length": number(match.group(1))}
    if match := re.match(rf"{num} to {num}\b", sentence):
        bounds["ge"], bounds["le"] = map(number, match.groups())
    for mark, name in (("≥", "ge"), (">", "gt"), ("≤", "le"), ("<", "lt")):
        if match := re.search(rf"(?:^|\band )\s*{mark} {num}", sentence):
            bounds[name] = number(match.group(1))
    return bounds


def doc_choices(rule: str) -> set[object]:
    sentence = first_sentence(rule)
    quoted = re.findall(r'`"([^"`]+)"`', sentence)
    if quoted:
        return set(quoted)
    return {int(n) for n in re.findall(r"\b\d+\b", sentence)}


def check_default(where: str, field: FieldInfo, cell: str) -> None:
    if field.is_required():
        assert cell == "required", f"{where}: required in the model, documented {cell!r}"
        return
    default = field.get_default(call_default_factory=True)
    if default is None:
        assert cell.startswith("none"), f"{where}: unset (None) by default, documented {cell!r}"
        return
    spans = code_spans(cell)
    assert spans, f"{where}: default {default!r} undocumented ({cell!r})"
    documented = tomllib.loads(f"v = {spans[0]}")["v"]
    expected = (
        [str(item) for item in default]  # networks as written in the file
        if isinstance(default, list)
        else default
    )
    assert (documented, type(documented)) == (expected, type(expected)), (
        f"{where}: default is {expected!r} in the model, {spans[0]} in the docs"
    )


def test_every_config_table_is_documented_and_nothing_else() -> None:
    documented = set(documented_sections())
    models = set(config_sections()) | {"[kafka]"}
    assert documented == models, (
        f"undocumented: {sorted(models - documented)}; "
        f"documented, not in the model: {sorted(documented - models)}"
    )
    overview = next(
        table
        for table in tables((ROOT / "docs" / "configuration.md").read_text())
        if table[0][:1] == ["Table"]
    )
    assert {code_spans(row[0])[0] for row in overview[1:]} == models


@pytest.mark.parametrize("section", sorted(config_sections()))
def test_config_key_table_matches_the_model(section: str) -> None:
    model = config_sections()[section]
    rows = key_table(section, documented_sections()[section])
    fields = {key: field for key, field in model.model_fields.items() if subtable(field) is None}
    assert set(rows) == set(fields), (
        f"{section}: in the model, not documented: {sorted(set(fields) - set(rows))}; "
        f"documented, not in the model: {sorted(set(rows) - set(fields))}"
    )
    for key, field in fields.items():
        row, where = rows[key], f"{section} {key}"
        assert row["Type"] == type_name(field.annotation), f"{where}: type {row['Type']!r}"
        check_default(where, field, row["Default"])
        annotation, _ = unwrap(field.annotation)
        bounds = model_bounds(field, VALIDATED_PATTERNS.get((section, key)))
        assert doc_bounds(row["Rule"]) == bounds, (
            f"{where}: bounds {bounds} in the model; the docs' first sentence "
            f"says {first_sentence(row['Rule'])!r}"
        )
        choices: set[object] | None = None
        if typing.get_origin(annotation) is typing.Literal:
            choices = set(typing.get_args(annotation))
        choices = VALIDATED_CHOICES.get((section, key), choices)
        if choices is not None:
            assert doc_choices(row["Rule"]) == choices, (
                f"{where}: allowed {sorted(map(str, choices))} in the model; the docs' first "
                f"sentence says {first_sentence(row['Rule'])!r}"
            )


def test_kafka_defaults_table_matches_kafka_defaults() -> None:
    body = documented_sections()["[kafka]"]
    [table] = [t for t in tables(body) if t[0] == ["Key", "Alias", "Default", "Why"]]
    rows = {code_spans(row[0])[0]: row for row in table[1:]}
    assert set(rows) == set(KAFKA_DEFAULTS)
    for key, (_, alias, default, _) in rows.items():
        assert code_spans(alias) == ([KAFKA_ALIASES[key]] if key in KAFKA_ALIASES else []), key
        documented = tomllib.loads(f"v = {code_spans(default)[0]}")["v"]
        assert (documented, type(documented)) == (KAFKA_DEFAULTS[key], type(KAFKA_DEFAULTS[key]))


def test_the_docs_test_sees_a_changed_default_and_bound() -> None:
    """The parsers above are not vacuous: a drift in the docs fails them."""
    field = Settings.model_fields["records"].annotation.model_fields["queue_size"]  # type: ignore[union-attr]
    check_default("queue_size", field, "`10000`")
    with pytest.raises(AssertionError):
        check_default("queue_size", field, "`10001`")
    assert doc_bounds("1 to 10,000,000. The capacity") == model_bounds(field)
    assert doc_bounds("1 to 1,000,000. The capacity") != model_bounds(field)


# ---------------------------------------------------------------- the CLI


def parser_commands() -> dict[str, dict[str, argparse.Action]]:
    """Each subcommand's options (by their long name), and the program's own under ""."""
    parser = build_parser()
    found = {"": {a.option_strings[-1]: a for a in parser._actions if a.option_strings}}
    [subparsers] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, sub in subparsers.choices.items():
        found[name] = {a.option_strings[-1]: a for a in sub._actions if a.option_strings}
    for options in found.values():
        options.pop("--help")
    return found


def documented_commands() -> dict[str, dict[str, dict[str, str]]]:
    """docs/cli.md: the rows of each command's option table, by option."""
    found: dict[str, dict[str, dict[str, str]]] = {}
    for title, body in sections((ROOT / "docs" / "cli.md").read_text()).items():
        match = re.fullmatch(r"`redirect-logger(?: ([a-z]+))?`", title)
        if match is None:
            continue
        option_tables = [t for t in tables(body) if t[0][:1] == ["Option"]]
        assert len(option_tables) == 1, f"{title}: {len(option_tables)} option tables"
        header, *rows = option_tables[0]
        assert header == ["Option", "Default", "Meaning"], f"{title}: columns {header}"
        found[match.group(1) or ""] = {
            code_spans(row[0])[0].split()[0]: dict(zip(header, row, strict=True)) for row in rows
        }
    return found


def test_cli_reference_documents_every_command_and_option() -> None:
    parsed, documented = parser_commands(), documented_commands()
    assert set(documented) == set(parsed), "commands documented vs in the parser"
    for command, options in parsed.items():
        rows = documented[command]
        assert set(rows) == set(options), (
            f"{command or 'redirect-logger'}: in the parser, not documented: "
            f"{sorted(set(options) - set(rows))}; documented, not in the parser: "
            f"{sorted(set(rows) - set(options))}"
        )
        for option, action in options.items():
            default = rows[option]["Default"]
            if action.required:
                assert default == "required", f"{command} {option}: required"
            elif isinstance(action.default, int | float) and not isinstance(action.default, bool):
                assert number(code_spans(default)[0]) == action.default, f"{command} {option}"


# ---------------------------------------------------------------- check's sample

CHECK_SAMPLE_CONFIG = """
[server]
bind = ["127.0.0.1:8080"]
[[rules]]
name = "home"
path = "/"
target = "https://example.com/"
[records]
topic = "redirect-hits"
[kafka]
"bootstrap.servers" = "kafka-1:9092"
"sasl.password" = "not-shown"
"""


def matches_sample(sample: Any, actual: Any, where: str = "") -> list[str]:
    """Where ``actual`` differs from the documented ``sample``; a table with
    the key ``"…"`` is shortened: its other keys must match, the rest may be."""
    if isinstance(sample, dict) and isinstance(actual, dict):
        keys = set(sample) - {"…"}
        drift = [] if "…" in sample else [f"{where}.{k}: undocumented" for k in set(actual) - keys]
        for key in sorted(keys):
            if key not in actual:
                drift.append(f"{where}.{key}: documented, not printed")
            else:
                drift += matches_sample(sample[key], actual[key], f"{where}.{key}")
        return drift
    if isinstance(sample, list) and isinstance(actual, list) and len(sample) == len(actual):
        return [
            d
            for i, (s, a) in enumerate(zip(sample, actual, strict=True))
            for d in matches_sample(s, a, f"{where}[{i}]")
        ]
    return [] if sample == actual else [f"{where}: documented {sample!r}, printed {actual!r}"]


def test_check_sample_output_is_what_check_prints(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    section = sections(text)["`redirect-logger check`"]
    [sample] = re.findall(r"```json\n(.*?)```", section, flags=re.DOTALL)
    path = tmp_path / "site.toml"
    path.write_text(CHECK_SAMPLE_CONFIG)
    printed = subprocess.run(
        [sys.executable, "-m", "redirect_logger.cli", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    drift = matches_sample(json.loads(sample), json.loads(printed))
    assert not drift, "; ".join(drift)
    assert matches_sample({"a": 1, "…": "…"}, {"a": 2, "b": 3}) == [".a: documented 1, printed 2"]


# ---------------------------------------------------------------- the stop time


def test_the_stop_time_with_the_defaults_is_the_sum_of_the_defaults() -> None:
    """docs/architecture.md#time-limits states the longest stop of ``serve``
    with the default settings: it must be the sum the grace_period check uses."""
    text = sections((ROOT / "docs" / "architecture.md").read_text(), "### ")["Time limits"]
    [(stated, terms)] = re.findall(r"\((\d+) s with the defaults: ([\d. +]+)\)", text)
    defaults = Settings.model_validate({"kafka": {"bootstrap.servers": "x:1"}})
    parts = [
        defaults.server.shutdown_delay,
        defaults.server.graceful_timeout,
        defaults.shutdown.flush_timeout,
        config.PURGE_ALLOWANCE,
    ]
    assert [float(term) for term in terms.split("+")] == parts
    assert float(stated) == sum(parts)


# ---------------------------------------------------------------- the README


def test_readme_hypercorn_line_binds_every_address_of_example_toml() -> None:
    """Under Hypercorn, -b is the only source of listeners: the README's line
    must name example.toml's bind and admin_bind, or nothing serves /healthz."""
    readme = (ROOT / "README.md").read_text()
    [command] = [
        block
        for block in re.findall(r"```sh\n(.*?)```", readme, flags=re.DOTALL)
        for block in [block.replace("\\\n", " ")]
        for block in block.splitlines()
        if "redirect_logger.asgi:app" in block
    ]
    words = shlex.split(command, comments=True)
    assert "REDIRECT_LOGGER_CONFIG=config/example.toml" in words
    binds = [words[i + 1] for i, word in enumerate(words) if word in ("-b", "--bind")]
    server = tomllib.loads((ROOT / "config" / "example.toml").read_text())["server"]
    assert binds == [*server["bind"], *server["admin_bind"]]
    assert server["admin_bind"], "example.toml no longer sets admin_bind: revisit this test"


# ---------------------------------------------------------------- links

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# A docs/*.md#anchor named outside the docs: config files, code, tests.
DOC_REFERENCE = re.compile(r"\bdocs/[\w.-]+\.md#[\w-]+")


def without_code_blocks(text: str) -> str:
    return re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.MULTILINE | re.DOTALL)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the text (a link's text, a code span's
    content) lower-cased, every character but letters, digits, spaces, ``-``
    and ``_`` removed, spaces made ``-``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file; a repeated one gets ``-1``, ``-2``…"""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for match in re.finditer(r"^#{1,6} +(.+?) *#*$", without_code_blocks(path.read_text()), re.M):
        base = slug(match.group(1).strip())
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(path: Path) -> list[str]:
    """The relative links of a markdown file whose file or heading is missing."""
    broken: list[str] = []
    for target in LINK.findall(without_code_blocks(path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(f"{target}: no file {shown(linked)}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {shown(linked)}")
    return broken


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def test_slug_follows_github() -> None:
    assert slug("Many workers: `serve --workers N`") == "many-workers-serve---workers-n"
    assert slug("`[[rules]]`") == "rules"
    assert slug("Results (2026-12-02, issue 12: the GC)") == "results-2026-12-02-issue-12-the-gc"
    assert slug("`client_ip`") == "client_ip"


@pytest.mark.parametrize(
    "doc",
    [
        "README.md",
        "CHANGELOG.md",
        *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
    ],
)
def test_every_relative_link_leads_to_a_file_and_heading(doc: str) -> None:
    broken = broken_links(ROOT / doc)
    assert not broken, f"{doc}: " + "; ".join(broken)


def test_the_link_check_sees_a_missing_heading(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## A `b` c\n\n[ok](#a-b-c) [gone](#nowhere) [no](missing.md)\n")
    assert broken_links(page) == [
        "#nowhere: no heading #nowhere in page.md",
        "missing.md: no file missing.md",
    ]


def test_docs_named_in_code_and_config_lead_to_a_heading() -> None:
    """A ``docs/<file>.md#<anchor>`` in config/, src/, tests/, benchmarks/ and
    docs/examples/ (comments, messages, alert annotations)."""
    broken: list[str] = []
    files = [
        p
        for folder in ("config", "src", "tests", "benchmarks", "docs/examples")
        for p in (ROOT / folder).rglob("*")
        if p.is_file()
        and p.suffix in (".py", ".yml", ".yaml", ".toml", ".cfg", ".service", "")
        and not any(part.endswith(".egg-info") for part in p.parts)  # pip's copy of the README
    ]
    for path in files:
        for reference in DOC_REFERENCE.findall(path.read_text(errors="replace")):
            file, _, anchor = reference.partition("#")
            if not (ROOT / file).exists() or anchor not in anchors(ROOT / file):
                broken.append(f"{path.relative_to(ROOT)}: {reference}")
    assert not broken, "; ".join(broken)
