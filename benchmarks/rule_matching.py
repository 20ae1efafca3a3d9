"""The request path's rule work before and after windows, macros and dynamic
targets (issue 16), side by side in one process.

    python benchmarks/rule_matching.py [--before main] [--rounds 101] [--requests 2000]

"Before" is rules.py and hits.py as they are at the git revision --before,
loaded next to this tree's; "after" is this tree. Each side does what
``Frontend._hit`` does before it admits a hit: match the rule, build the
Location (a rule with a window, macros or target_param through links.py on
the "after" side), and build the ``Hit``. Many short rounds alternate the
sides on the same requests, so machine noise lands on all of them; each
figure is the best round's CPU time (and the median round's), in ns per
request, and the ratios are after / before of the best rounds. A second
copy of "before" runs as a control: its ratio to "before" is what noise
alone makes.

Tables: the same plain rules on both sides (exact, tolerant, prefix, host
and wildcard rules); then, on the "after" side only, those rules plus live
rules that the requests never reach (a plain rule must not pay for them);
then requests to the live rules themselves, for what each feature costs.
Bounded: --rounds x --requests calls per table.
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

from redirect_logger import hits as hits_after
from redirect_logger import rules as rules_after
from redirect_logger.config import parse_settings

ROOT = Path(__file__).resolve().parent.parent
HIT_ID = "019ad3c2-5c1e-7a00-8000-00000000000a"
SCOPE_BASE: dict[str, Any] = {
    "type": "http",
    "method": "GET",
    "scheme": "https",
    "headers": [(b"host", b"go.example.com"), (b"user-agent", b"bench/1")],
    "client": ("192.0.2.1", 4000),
}


def load_before(revision: str) -> tuple[ModuleType, ModuleType]:
    """rules.py and hits.py at ``revision``, as modules of the installed package
    (their relative imports resolve to this tree's config, bots, commit)."""
    loaded = []
    for name in ("rules", "hits"):
        source = subprocess.run(
            ["git", "show", f"{revision}:src/redirect_logger/{name}.py"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        full = f"redirect_logger._before_{name}"
        spec = importlib.util.spec_from_loader(full, loader=None)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        module.__package__ = "redirect_logger"
        sys.modules[full] = module
        if name == "hits":  # its ``from .rules import`` takes the revision's rules
            source = source.replace("from .rules import", "from ._before_rules import")
        exec(compile(source, f"{revision}:{name}.py", "exec"), module.__dict__)
        loaded.append(module)
    return loaded[0], loaded[1]


def plain_rules(count: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for n in range(count):
        kind = n % 5
        rule: dict[str, Any] = {"name": f"r{n}", "target": f"https://t{n}.example.com/x?s={n}"}
        if kind == 0:
            rule["path"] = f"/l/{n}"
        elif kind == 1:
            rule |= {"path": f"/t/{n}", "case_insensitive": True, "trailing_slash": True}
        elif kind == 2:
            rule |= {"path": f"/p/{n}/*", "forward_path": True}
        elif kind == 3:
            rule |= {"path": f"/h/{n}", "host": "go.example.com"}
        else:
            rule |= {"path": f"/w/{n}", "host": "*.example.com"}
        found.append(rule)
    return found


def live_rules() -> list[dict[str, Any]]:
    return [
        {
            "name": "window",
            "path": "/live/window",
            "target": "https://shop.example/sale",
            "valid_from": "2020-01-01T00:00:00Z",
            "valid_until": "2100-01-01T00:00:00Z",
        },
        {
            "name": "macro",
            "path": "/live/macro",
            "target": "https://example.com/app?click={hit_id}&src={rule}",
        },
        {
            "name": "dynamic",
            "path": "/live/dynamic",
            "target_param": "u",
            "allowed_hosts": ["example.com", "*.example.org"],
        },
    ]


def requests(count: int, rules: int) -> list[tuple[str, bytes, bytes]]:
    """(path, query, host) for plain rules of every kind, and misses."""
    rng = random.Random(16)
    made = []
    for _ in range(count):
        n = rng.randrange(rules)
        kind = n % 5
        path = {
            0: f"/l/{n}",
            1: f"/T/{n}/",
            2: f"/p/{n}/a/b",
            3: f"/h/{n}",
            4: f"/w/{n}",
        }[kind]
        if rng.random() < 0.1:
            path = f"/missing/{n}"
        query = b"utm_source=mail&x=1" if rng.random() < 0.5 else b""
        made.append((path, query, b"go.example.com"))
    return made


def before_path(table: Any, hit_class: Any) -> Callable[[str, bytes, bytes], object]:
    def answer(path: str, query: bytes, host: bytes) -> object:
        target, remainder = table.match(path, host if table.by_host else None)
        location = target.location(remainder, query)
        scope = {**SCOPE_BASE, "path": path, "query_string": query}
        return hit_class.from_scope(scope, HIT_ID, 0.0, target.status, location, target.name)

    return answer


def after_path(table: Any, hit_class: Any) -> Callable[[str, bytes, bytes], object]:
    def answer(path: str, query: bytes, host: bytes) -> object:  # as app.Frontend._hit
        target, remainder = table.match(path, host if table.by_host else None)
        detail = None
        if target.live is None:
            location = target.location(remainder, query)
        else:
            target, location, detail = target.live.resolve(path, remainder, query, HIT_ID, 0.0)
        scope = {**SCOPE_BASE, "path": path, "query_string": query}
        return hit_class.from_scope(
            scope, HIT_ID, 0.0, target.status, location, target.name, detail=detail
        )

    return answer


def timed(
    answer: Callable[[str, bytes, bytes], object], work: list[tuple[str, bytes, bytes]]
) -> float:
    start = time.perf_counter_ns()
    for path, query, host in work:
        answer(path, query, host)
    return (time.perf_counter_ns() - start) / len(work)


def compare(
    label: str,
    sides: dict[str, Callable[[str, bytes, bytes], object]],
    work: list[Any],
    rounds: int,
) -> dict[str, float]:
    figures: dict[str, list[float]] = {name: [] for name in sides}
    for answer in sides.values():
        timed(answer, work[:1000])  # warm caches
    for round_ in range(rounds):
        order = list(sides.items())
        order = order[round_ % len(order) :] + order[: round_ % len(order)]
        for name, answer in order:
            figures[name].append(timed(answer, work))
    best = {name: min(values) for name, values in figures.items()}
    cells = "  ".join(
        f"{name} {best[name]:6.0f} ns (median {statistics.median(figures[name]):6.0f})"
        for name in sides
    )
    print(f"{label:<44} {cells}", flush=True)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="main", help="git revision of the 'before' code")
    parser.add_argument("--rounds", type=int, default=101)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rules", type=int, default=1000)
    args = parser.parse_args()
    rules_before, hits_before = load_before(args.before)
    kafka = {"bootstrap.servers": "127.0.0.1:9"}
    plain = parse_settings({"kafka": kafka, "rules": plain_rules(args.rules)})
    mixed = parse_settings({"kafka": kafka, "rules": plain_rules(args.rules) + live_rules()})
    before = before_path(rules_before.RuleTable.from_settings(plain), hits_before.Hit)
    after = after_path(rules_after.RuleTable.from_settings(plain), hits_after.Hit)
    after_mixed = after_path(rules_after.RuleTable.from_settings(mixed), hits_after.Hit)
    work = requests(args.requests, args.rules)
    print(
        f"{args.rules} plain rules, {args.requests} requests a round, {args.rounds} rounds; "
        f"CPU ns per request, best round (median round), before = {args.before}"
    )
    control = before_path(rules_before.RuleTable.from_settings(plain), hits_before.Hit)
    first = compare(
        "plain rules",
        {"before": before, "control": control, "after": after},
        work,
        args.rounds,
    )
    second = compare(
        "plain requests, live rules in the table too",
        {"before": before, "control": control, "after": after_mixed},
        work,
        args.rounds,
    )
    for label, found in (("plain table", first), ("with live rules", second)):
        print(
            f"{label}: after/before {found['after'] / found['before']:.3f}, "
            f"control/before {found['control'] / found['before']:.3f}"
        )
    live = {
        "window": [("/live/window", b"", b"x")] * args.requests,
        "macro": [("/live/macro", b"x=1", b"x")] * args.requests,
        "dynamic, allowed": [("/live/dynamic", b"u=https%3A%2F%2Fa.example.org%2Fp%3Fq%3D1", b"x")]
        * args.requests,
        "dynamic, refused": [("/live/dynamic", b"u=https://evil.com/", b"x")] * args.requests,
    }
    for name, live_work in live.items():
        compare(f"live rule: {name}", {"after": after_mixed}, live_work, args.rounds)


if __name__ == "__main__":
    main()
