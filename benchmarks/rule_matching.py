"""The request path's rule step, at a git revision and in this tree, side by
side in one process.

    python benchmarks/rule_matching.py [--before 615d13b] [--rounds 301] [--requests 200]

The rule step is what ``app.Frontend._hit`` does from the request to its
answer: match the path (and host), then a live rule's window, macros or
dynamic target (links.py), or else a routed rule's route or split
(routing.py), both for a rule that combines them, and the Location. In
this tree that is ``RuleTable.answer``; at a revision without it, the
steps its app.py took (match and Location;
then ``target.live``; then ``target.routing``), chosen once by what its
``Target`` has. "Before" is rules.py, links.py and routing.py as they are at
``--before`` (by default 615d13b, the commit before windows, macros, dynamic
targets, routes and splits), loaded beside this tree's; "control" is a
second copy of "before", whose ratio to it is what noise alone makes.

Each case is a list of requests. Many short rounds alternate the sides on
the same requests, so the machine's noise lands on all of them; a figure is
the process CPU time (not the wall clock: on a shared machine the time other
processes hold the cores would count) per request of the best round, and of
the median round. Ratios are after / before. A case whose feature the
revision lacks has no "before" (its ratio reads "new"). Bounded: --rounds x
--requests calls per case and side.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from redirect_logger import routing as routing_after
from redirect_logger import rules as rules_after
from redirect_logger.bots import Agents
from redirect_logger.config import RecordsSettings, ServerSettings, parse_settings

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BEFORE = "615d13b"  # 49a5753~1: before windows, macros, dynamic targets, routes, splits
HIT_ID = "019ad3c2-5c1e-7a00-8000-00000000000a"
NOW = 1_767_225_600.0  # 2026-01-01, inside the window
KAFKA = {"bootstrap.servers": "127.0.0.1:9"}
HOST = b"go.example.com"
IPHONE = b"Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 Mobile"

Request = tuple[dict[str, Any], bytes | None]
Step = Callable[[dict[str, Any], bytes | None], object]


def load(revision: str) -> dict[str, ModuleType]:
    """links.py, routing.py and rules.py at ``revision`` (those it has), as
    modules of the installed package importing one another; their other
    relative imports (config, bots) are this tree's."""
    loaded: dict[str, ModuleType] = {}
    for name in ("links", "routing", "rules"):  # rules imports links (and routing)
        shown = subprocess.run(
            ["git", "show", f"{revision}:src/redirect_logger/{name}.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if shown.returncode != 0:
            continue
        source = shown.stdout
        for other in loaded:
            source = source.replace(f"from .{other} import", f"from ._before_{other} import")
        full = f"redirect_logger._before_{name}"
        spec = importlib.util.spec_from_loader(full, loader=None)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        module.__package__ = "redirect_logger"
        sys.modules[full] = module
        exec(compile(source, f"{revision}:{name}.py", "exec"), module.__dict__)
        loaded[name] = module
    return loaded


def plain_rules(count: int) -> list[dict[str, Any]]:
    """Half exact rules (/l/N), half prefix rules (/p/N/*) forwarding the path."""
    found: list[dict[str, Any]] = []
    for n in range(count):
        if n % 2:
            found.append({"name": f"p{n}", "path": f"/p/{n}/*", "forward_path": True})
        else:
            found.append({"name": f"l{n}", "path": f"/l/{n}"})
        found[-1]["target"] = f"https://t{n}.example.com/x?s={n}"
    return found


FEATURE_RULES: list[dict[str, Any]] = [
    {
        "name": "window",
        "path": "/f/window",
        "target": "https://shop.example/sale",
        "valid_from": "2020-01-01T00:00:00Z",
        "valid_until": "2100-01-01T00:00:00Z",
    },
    {"name": "macro", "path": "/f/macro", "target": "https://example.com/app?click={hit_id}"},
    {
        "name": "dynamic",
        "path": "/f/dynamic",
        "target_param": "u",
        "allowed_hosts": ["example.com", "*.example.org"],
    },
    {
        "name": "app",
        "path": "/f/app",
        "target": "https://example.com/app",
        "routes": [
            {"os": ["iOS"], "target": "https://apps.apple.com/app/id1"},
            {"os": ["Android"], "target": "https://play.google.com/store"},
        ],
    },
    {
        "name": "landing",
        "path": "/f/landing",
        "target": "https://example.com/landing",
        "split": [
            {"name": "a", "weight": 50, "target": "https://example.com/a"},
            {"name": "b", "weight": 50, "target": "https://example.com/b"},
        ],
    },
]
# Rules that combine routes or a split with a window and macros (issue 16's last gap)
COMBINED_RULES: list[dict[str, Any]] = [
    {
        "name": "timed-ab",
        "path": "/f/timed-ab",
        "target": "https://example.com/landing",
        "valid_from": "2020-01-01T00:00:00Z",
        "valid_until": "2100-01-01T00:00:00Z",
        "split": [
            {"name": "a", "weight": 50, "target": "https://example.com/a?click={hit_id}"},
            {"name": "b", "weight": 50, "target": "https://example.com/b?click={hit_id}"},
        ],
    },
    {
        "name": "app-click",
        "path": "/f/app-click",
        "target": "https://example.com/app?click={hit_id}",
        "routes": [{"os": ["iOS"], "target": "https://apps.apple.com/app/id1?ct={hit_id}"}],
    },
]


def scope(path: str, query: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None) -> Any:
    return {
        "type": "http",
        "scheme": "https",
        "path": path,
        "query_string": query,
        "headers": [(b"host", HOST), *(headers or [])],
        "client": ("192.0.2.1", 4000),
    }


def plain_requests(kind: str, rules: int, count: int, query: bytes = b"") -> list[Any]:
    """Requests to random exact (or prefix) rules of a table of ``rules``."""
    rng = random.Random(16)
    made = []
    for _ in range(count):
        n = rng.randrange(rules // 2) * 2 + (kind == "prefix")
        made.append(scope(f"/p/{n}/a/b" if kind == "prefix" else f"/l/{n}", query))
    return made


# (case, table, feature the revision needs, the requests for --requests and --rules)
Case = tuple[str, str, str | None, Callable[[int], list[dict[str, Any]]]]
CASES: list[Case] = [
    ("exact rule, 100 rules", "100", None, lambda n: plain_requests("exact", 100, n)),
    ("prefix rule, 100 rules", "100", None, lambda n: plain_requests("prefix", 100, n)),
    ("exact rule, 1,000 rules", "1000", None, lambda n: plain_requests("exact", 1000, n)),
    ("prefix rule, 1,000 rules", "1000", None, lambda n: plain_requests("prefix", 1000, n)),
    ("exact, 1,000 + live/routed", "1000+", None, lambda n: plain_requests("exact", 1000, n)),
    ("prefix, 1,000 + live/routed", "1000+", None, lambda n: plain_requests("prefix", 1000, n)),
    (
        "exact, 1,000 + live/routed, query",
        "1000+",
        None,
        lambda n: plain_requests("exact", 1000, n, b"utm_source=mail&x=1"),
    ),
    ("miss (fallback 404)", "1000+", None, lambda n: [scope("/missing")] * n),
    ("window (inside)", "1000+", "live", lambda n: [scope("/f/window")] * n),
    ("macro {hit_id}", "1000+", "live", lambda n: [scope("/f/macro", b"x=1")] * n),
    (
        "dynamic target, allowed",
        "1000+",
        "live",
        lambda n: [scope("/f/dynamic", b"u=https%3A%2F%2Fa.example.org%2Fp%3Fq%3D1")] * n,
    ),
    (
        "dynamic target, refused",
        "1000+",
        "live",
        lambda n: [scope("/f/dynamic", b"u=https://evil.com/")] * n,
    ),
    (
        "route by OS (agent cached)",
        "1000+",
        "routing",
        lambda n: [scope("/f/app", b"", [(b"user-agent", IPHONE)])] * n,
    ),
    ("split, first visit (drawn)", "1000+", "routing", lambda n: [scope("/f/landing")] * n),
    (
        "split, variant kept (cookie)",
        "1000+",
        "routing",
        lambda n: [scope("/f/landing", b"", [(b"cookie", b"rl_landing=b")])] * n,
    ),
    (
        "window + split + {hit_id}, kept",
        "1000+",
        "combined",
        lambda n: [scope("/f/timed-ab", b"", [(b"cookie", b"rl_timed-ab=b")])] * n,
    ),
    (
        "route + {hit_id} (agent cached)",
        "1000+",
        "combined",
        lambda n: [scope("/f/app-click", b"", [(b"user-agent", IPHONE)])] * n,
    ),
]


def step_of(rules: ModuleType, routing: ModuleType | None, table: Any) -> Step:
    """The rule step as the app.py of that revision takes it."""
    clients = None
    if routing is not None:
        clients = routing.Clients(
            Agents(), RecordsSettings(), ServerSettings(), lambda peer, _: peer
        )
    if hasattr(rules.RuleTable, "answer"):
        return lambda request, host: table.answer(request, host, clients, HIT_ID, NOW)
    fields = rules.Target.__dataclass_fields__

    def plain(request: dict[str, Any], host: bytes | None) -> object:
        target, remainder = table.match(request["path"], host)
        return target.location(remainder, request["query_string"])

    def live(request: dict[str, Any], host: bytes | None) -> object:
        path = request["path"]
        target, remainder = table.match(path, host)
        if target.live is not None:
            return target.live.resolve(path, remainder, request["query_string"], HIT_ID, NOW)
        return target, target.location(remainder, request["query_string"]), None

    def live_or_routed(request: dict[str, Any], host: bytes | None) -> object:
        path = request["path"]
        target, remainder = table.match(path, host)
        detail = route = variant = cookie = None
        if target.live is not None:
            target, location, detail = target.live.resolve(
                path, remainder, request["query_string"], HIT_ID, NOW
            )
        else:
            if target.routing is not None:
                target, route, variant, cookie = target.routing.choose(request, clients)
            location = target.location(remainder, request["query_string"])
        return target, location, detail, route, variant, cookie

    if "routing" in fields:
        return live_or_routed
    return live if "live" in fields else plain


def timed(step: Step, work: list[Request]) -> float:
    start = time.process_time_ns()
    for request, host in work:
        step(request, host)
    return (time.process_time_ns() - start) / len(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--before", default=DEFAULT_BEFORE, help="git revision of the 'before' code"
    )
    parser.add_argument("--rounds", type=int, default=301)
    parser.add_argument("--requests", type=int, default=200, help="requests per case and round")
    args = parser.parse_args()
    before = load(args.before)
    rules_before = before["rules"]
    routing_before = before.get("routing")
    fields = rules_before.Target.__dataclass_fields__
    has = {
        None: True,
        "live": "live" in fields,
        "routing": "routing" in fields,
        "combined": "vary" in fields,
    }
    specs = {
        "100": plain_rules(100),
        "1000": plain_rules(1000),
        "1000+": plain_rules(1000) + FEATURE_RULES + COMBINED_RULES,
    }
    tables_after = {
        key: rules_after.RuleTable.from_settings(parse_settings({"kafka": KAFKA, "rules": rules}))
        for key, rules in specs.items()
    }
    steps: dict[str, dict[str, Step]] = {key: {} for key in specs}
    for key, table in tables_after.items():
        steps[key]["after"] = step_of(rules_after, routing_after, table)
    for key, rules in specs.items():
        # the rules the revision knows: a feature rule it lacks would be read wrong
        known = [
            rule
            for rule in rules
            if (has["live"] or rule["name"] not in ("window", "macro", "dynamic"))
            and (has["routing"] or rule["name"] not in ("app", "landing"))
            and (has["combined"] or rule["name"] not in ("timed-ab", "app-click"))
        ]
        settings = parse_settings({"kafka": KAFKA, "rules": known})
        for side in ("before", "control"):
            table = rules_before.RuleTable.from_settings(settings)
            steps[key][side] = step_of(rules_before, routing_before, table)
    work: dict[str, list[Request]] = {}
    sides_of: dict[str, list[str]] = {}
    for case, key, feature, make in CASES:
        host = HOST if tables_after[key].by_host else None
        work[case] = [(request, host) for request in make(args.requests)]
        sides_of[case] = ["before", "control", "after"] if has[feature] else ["after"]
    figures: dict[tuple[str, str], list[float]] = {}
    for case, key, *_ in CASES:
        for side in sides_of[case]:
            timed(steps[key][side], work[case])  # warm the caches
            figures[case, side] = []
    for round_ in range(args.rounds):
        for case, key, *_ in CASES:
            sides = sides_of[case]
            turn = round_ % len(sides)
            for side in sides[turn:] + sides[:turn]:
                figures[case, side].append(timed(steps[key][side], work[case]))
    print(
        f"before = {args.before}; {args.rounds} rounds of {args.requests} requests per case "
        "and side; CPU ns per request, best round (median round)"
    )
    print("| case | before | control | after | after/before | control/before |")
    print("| --- | --- | --- | --- | --- | --- |")
    for case, *_ in CASES:
        best = {side: min(figures[case, side]) for side in sides_of[case]}
        median = {side: statistics.median(figures[case, side]) for side in sides_of[case]}
        cells = [
            f"{best[side]:,.0f} ({median[side]:,.0f})" if side in best else "—"
            for side in ("before", "control", "after")
        ]
        if "before" in best:
            ratios = [
                f"{best[side] / best['before']:.2f} ({median[side] / median['before']:.2f})"
                for side in ("after", "control")
            ]
        else:
            ratios = ["new", "—"]
        print(f"| {case} | " + " | ".join(cells + ratios) + " |", flush=True)


if __name__ == "__main__":
    main()
