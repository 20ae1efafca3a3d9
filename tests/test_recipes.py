"""docs/recipes.md is true: each recipe's TOML loads, and each of its
request rows gets exactly the documented answer from the rule table (at the
row's time, with its headers, and the route and variant its record names,
where the row gives them). The "Protobuf devices" recipe is run whole: its .proto
compiled by its command, the service started with its TOML on Apache Kafka,
its client run, and the records compared with its JSON."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
import pytest
import trio

from brokers import Broker
from redirect_logger.bots import Agents
from redirect_logger.config import RecordsSettings, ServerSettings, load_settings
from redirect_logger.routing import Clients
from redirect_logger.rules import RuleTable
from support import ledger_counts, read_messages, service_config, start_service, unique_topic

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


def blocks(title: str, language: str) -> list[str]:
    """The code blocks of one language in the recipe with this title."""
    [section] = [
        part
        for part in RECIPES.read_text(encoding="utf-8").split("\n## ")[1:]
        if part.splitlines()[0] == title
    ]
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


def build_schema(title: str, directory: Path) -> None:
    """Write the recipe's .proto, if it has one, and run its protoc commands
    (with grpcio-tools' protoc) in ``directory``."""
    protos = blocks(title, "proto")
    if not protos:
        return
    [proto] = protos
    (directory / "gps.proto").write_text(proto, encoding="utf-8")
    for command in blocks(title, "sh"):
        arguments = shlex.split(command)
        assert arguments[0] == "protoc", command
        subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", *arguments[1:]], cwd=directory, check=True
        )


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
        ("An A/B landing-page test", 5),
        ("Protobuf devices", 0),
    ]


@pytest.mark.parametrize(("title", "toml", "rows"), recipes(), ids=lambda v: str(v)[:20])
def test_each_recipe_answers_as_documented(
    title: str, toml: str, rows: list[Row], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_schema(title, tmp_path)
    monkeypatch.chdir(tmp_path)  # the recipe's relative paths
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
        now = datetime.fromisoformat(when) if when else NOW
        target, location, _, route, variant, _ = table.answer(
            request, host, who, HIT_ID, now.timestamp()
        )
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
    request = scope("https://l.example.com/spring", [])
    answers = [table.answer(request, None, clients(), HIT_ID, NOW.timestamp()) for _ in range(200)]
    cookies = {cookie for *_, cookie in answers}
    assert documented.group(1).encode() in cookies
    assert len(cookies) == 2  # one per variant
    assert {target.vary for target, *_ in answers} == {b"Cookie"}
    assert "`Vary: Cookie`" in section


async def test_the_protobuf_recipe_records_what_it_says(
    kafka_broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    title = "Protobuf devices"
    build_schema(title, tmp_path)
    monkeypatch.chdir(tmp_path)
    [toml] = blocks(title, "toml")
    recipe = tomllib.loads(toml)
    topic, events = unique_topic(), unique_topic("gps")
    config = service_config(
        kafka_broker.bootstrap, topic, collect={**recipe["collect"], "topic": events}
    )
    [client] = blocks(title, "python")
    [expected] = blocks(title, "json")
    stop = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            url = "https://t.example.com/collect"
            assert url in client
            (tmp_path / "client.py").write_text(
                client.replace(url, f"{service.binds[0]}/collect"), encoding="utf-8"
            )
            done = await trio.run_process(
                [sys.executable, "client.py"], cwd=tmp_path, capture_stdout=True
            )
            stop.set()
    assert codes == [0]
    assert done.stdout.decode() == '202 {"accepted":2}\n'
    assert service.ledger_snapshot() == ledger_counts(received=2, delivered=2)
    read = await trio.to_thread.run_sync(read_messages, kafka_broker.bootstrap, events, 30.0, 2)
    records = sorted((message.record for message in read), key=lambda r: r["data"]["sequence"])
    assert [record["data"] for record in records] == [
        json.loads(line) for line in expected.splitlines()
    ]
    assert [record["kind"] for record in records] == ["event", "event"]
    records_page = (RECIPES.parent / "records.md").read_text(encoding="utf-8")
    assert f"```json\n{expected.splitlines()[0]}\n```" in records_page  # the same example
