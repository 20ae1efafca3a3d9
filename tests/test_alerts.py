"""config/prometheus/alerts.yml: promtool checks its syntax and, with
tests/alerts_test.yml, its logic; every metric it names is one a Service
exports; every runbook link it gives leads to a heading of docs/runbook.md.

promtool is Debian's package ``prometheus`` (``.ci/run`` installs it). Without
it the promtool tests fail, unless ``REDIRECT_LOGGER_NO_PROMTOOL=1``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from redirect_logger.config import parse_settings
from redirect_logger.service import Service
from support import unreachable_config
from test_docs import anchors

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "config" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "tests" / "alerts_test.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"
METRIC = re.compile(r"\bredirect_logger_[a-z0-9_]+\b")
# The suffixes Prometheus adds to a family's samples.
SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("REDIRECT_LOGGER_NO_PROMTOOL") == "1":
            pytest.skip("promtool is missing and REDIRECT_LOGGER_NO_PROMTOOL=1")
        pytest.fail(
            "promtool is missing: apt-get install prometheus (Debian), "
            "or set REDIRECT_LOGGER_NO_PROMTOOL=1 to skip this test"
        )
    return found


def rules() -> list[dict[str, object]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_check_rules_accepts_the_alerts() -> None:
    done = subprocess.run(
        [promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_test_rules_passes_the_alerts_unit_tests() -> None:
    done = subprocess.run(
        [promtool(), "test", "rules", str(ALERT_TESTS)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ALERT_TESTS.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_check_rules_refuses_a_bad_expression(tmp_path: Path) -> None:
    """The check is not vacuous."""
    bad = tmp_path / "bad.yml"
    bad.write_text(ALERTS.read_text().replace("> 0", "> > 0", 1))
    done = subprocess.run(
        [promtool(), "check", "rules", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0


def exported_metrics() -> set[str]:
    """Every sample name a Service's /metrics has, without a broker or a server."""
    service = Service(parse_settings(unreachable_config()))
    text = service.metrics.exposition().decode()
    names = {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }
    assert "redirect_logger_records_total" in names and "redirect_logger_in_flight" in names
    return names


def test_every_metric_an_alert_uses_is_exported() -> None:
    exported = exported_metrics()
    used = {name for rule in rules() for name in METRIC.findall(str(rule["expr"]))}
    assert used, "no metric found in the alerts"
    assert used <= exported, f"not exported by metrics.py: {sorted(used - exported)}"


def test_every_alert_has_for_severity_summary_and_a_runbook_section() -> None:
    headings = anchors(RUNBOOK)
    for rule in rules():
        name = rule["alert"]
        assert isinstance(name, str)
        assert "for" in rule, f"{name}: no for"
        labels, annotations = rule["labels"], rule["annotations"]
        assert isinstance(labels, dict) and isinstance(annotations, dict)
        assert labels.get("severity") in ("warning", "critical"), f"{name}: severity"
        assert annotations.get("summary"), f"{name}: no summary"
        links = re.findall(r"docs/runbook\.md#([a-z0-9_-]+)", annotations["description"])
        assert links == [name.lower()], f"{name}: the description's runbook link is {links}"
        assert links[0] in headings, f"{name}: docs/runbook.md has no heading #{links[0]}"
