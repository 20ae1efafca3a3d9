"""What rule matching costs per request, before and after routes and splits.

    python benchmarks/rule_match.py [--before /path/to/older/src] [--rounds 7]

The request path's rule step, as ``app.Frontend._hit`` takes it: match the
path (and host), pick a routed rule's target (only where the code has
routes: one attribute test for a rule without them), build the Location.
Timed with ``timeit`` (in process CPU time) per case, in alternating rounds of this checkout and,
with ``--before``, of another checkout's ``src`` (run in a subprocess with it
on ``sys.path``), so both are measured side by side under the same load; the
medians and their ratio are printed. The routed cases (an OS route with the
agent cached, a language route, a kept and a drawn variant) exist only where
routing does. Bounded: a fixed number of calls per round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import timeit
from pathlib import Path
from typing import Any

IPHONE = b"Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 Mobile"
HOST = b"l.example.com"
# The process's CPU time, not the wall clock: on a shared machine the time
# other processes hold the cores would count, and swamp nanoseconds.
CPU = time.process_time
WINDOWS = b"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/120 Safari/537.36"

PLAIN_RULES: list[dict[str, Any]] = [
    {"name": "home", "path": "/", "target": "https://example.com/"},
    {
        "name": "docs",
        "path": "/docs/*",
        "target": "https://docs.example.com/",
        "forward_path": True,
    },
    {"name": "go", "host": "go.example.com", "path": "/launch", "target": "https://e.com/l"},
    *({"name": f"r{n}", "path": f"/r{n}", "target": f"https://e.com/{n}"} for n in range(200)),
]
ROUTED_RULES: list[dict[str, Any]] = [
    {
        "name": "app",
        "path": "/app",
        "target": "https://example.com/app",
        "routes": [
            {"os": ["iOS"], "target": "https://apps.apple.com/app/id1"},
            {"os": ["Android"], "target": "https://play.google.com/store"},
            {"languages": ["de"], "target": "https://example.com/de/app"},
        ],
    },
    {
        "name": "landing",
        "path": "/landing",
        "target": "https://example.com/landing",
        "split": [
            {"name": "a", "weight": 50, "target": "https://example.com/a"},
            {"name": "b", "weight": 50, "target": "https://example.com/b"},
        ],
    },
]
# (case, rules, path, query, headers)
CASES: list[tuple[str, str, str, bytes, list[tuple[bytes, bytes]]]] = [
    ("exact rule, no query", "plain", "/r150", b"", []),
    ("exact rule, query forwarded", "plain", "/r150", b"utm_source=x", []),
    ("prefix rule, path forwarded", "plain", "/docs/a/b", b"", []),
    ("fallback 404", "plain", "/missing", b"", []),
    ("route by OS (agent cached)", "routed", "/app", b"", [(b"user-agent", IPHONE)]),
    (
        "route by language",
        "routed",
        "/app",
        b"",
        [(b"user-agent", WINDOWS), (b"accept-language", b"de-AT,de;q=0.9,en;q=0.5")],
    ),
    ("no route applies", "routed", "/app", b"", [(b"user-agent", WINDOWS)]),
    ("split, variant kept by cookie", "routed", "/landing", b"", [(b"cookie", b"rl_landing=b")]),
    ("split, variant drawn", "routed", "/landing", b"", []),
]


def measure(number: int) -> dict[str, float]:
    """ns per request of each case this checkout can run."""
    from redirect_logger.config import parse_settings
    from redirect_logger.rules import RuleTable, Target

    routed = "routing" in Target.__dataclass_fields__
    tables = {"plain": PLAIN_RULES}
    if routed:
        tables["routed"] = ROUTED_RULES
    compiled = {
        name: RuleTable.from_settings(
            parse_settings({"kafka": {"bootstrap.servers": "127.0.0.1:9"}, "rules": rules})
        )
        for name, rules in tables.items()
    }
    clients: Any = None
    if routed:
        from redirect_logger.bots import Agents
        from redirect_logger.config import RecordsSettings, ServerSettings
        from redirect_logger.routing import Clients

        clients = Clients(Agents(), RecordsSettings(), ServerSettings(), lambda peer, _: peer)
    found: dict[str, float] = {}
    for case, rules, path, query, headers in CASES:
        if rules not in compiled:
            continue
        table = compiled[rules]
        scope = {"scheme": "http", "path": path, "query_string": query, "headers": headers}

        if routed:

            def step(table: Any = table, scope: dict[str, Any] = scope) -> object:
                target, remainder = table.match(scope["path"], HOST if table.by_host else None)
                if target.routing is not None:
                    target = target.routing.choose(scope, clients)[0]
                return target.location(remainder, scope["query_string"])
        else:

            def step(table: Any = table, scope: dict[str, Any] = scope) -> object:
                target, remainder = table.match(scope["path"], HOST if table.by_host else None)
                return target.location(remainder, scope["query_string"])

        step()  # warm the caches
        found[case] = timeit.timeit(step, number=number, timer=CPU) / number * 1e9
    if routed:  # the one step a rule without routes pays: the attribute test alone
        plain = compiled["plain"].match("/r150")[0]
        test = timeit.timeit(lambda: plain.routing is not None, number=number, timer=CPU)
        empty = timeit.timeit(lambda: None, number=number, timer=CPU)
        found["the routing test alone"] = (test - empty) / number * 1e9
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="the src directory of the older checkout")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--number", type=int, default=200_000, help="calls per case and round")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import redirect_logger

        print(json.dumps({"_from": redirect_logger.__file__, **measure(args.number)}))
        return
    here = Path(__file__).resolve().parent.parent / "src"
    sides = {"after": here} | ({"before": args.before.resolve()} if args.before else {})
    runs: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    for _ in range(args.rounds):
        for side, src in sides.items():
            command = [sys.executable, __file__, "--child", "--number", str(args.number)]
            env = {**os.environ, "PYTHONPATH": str(src)}  # before the installed checkout
            output = subprocess.run(
                command, capture_output=True, text=True, check=True, env=env
            ).stdout
            runs[side].append(json.loads(output))
    print(
        f"ns per request: the fastest (and the median) of {args.rounds} rounds "
        f"of {args.number:,} calls"
    )
    header = "| case | after ns |" + (" before ns | after/before |" if args.before else "")
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for side, run_list in runs.items():
        print(f"{side}: {run_list[0].pop('_from')}")
        for run in run_list[1:]:
            run.pop("_from")

    def figure(side: str, case: str) -> tuple[float, float]:
        values = [run[case] for run in runs[side]]
        return min(values), statistics.median(values)

    for case in [case for case, *_ in CASES] + ["the routing test alone"]:
        after, after_median = figure("after", case)
        row = f"| {case} | {after:,.0f} ({after_median:,.0f}) |"
        if "before" in runs and case in runs["before"][0]:
            before, before_median = figure("before", case)
            row += (
                f" {before:,.0f} ({before_median:,.0f}) | {after / before:.2f} "
                f"({after_median / before_median:.2f}) |"
            )
        elif "before" in runs:
            row += " | |"
        print(row)
    spreads = {
        side: max(
            (max(r[c] for r in run_list) - min(r[c] for r in run_list))
            / statistics.median(r[c] for r in run_list)
            for c in run_list[0]
            if c != "the routing test alone"  # a difference of two near-equal times
        )
        for side, run_list in runs.items()
    }
    print(
        "largest spread between rounds (max - min) / median: "
        + ", ".join(f"{side} {spread:.0%}" for side, spread in spreads.items())
    )


if __name__ == "__main__":
    main()
