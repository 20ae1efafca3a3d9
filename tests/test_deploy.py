"""The deployment files under config/: each is checked by the tool that knows
its format (systemd-analyze, Kubernetes' JSON schemas), and against the
config file it runs with, so that the stop timeouts, ports and journal paths
cannot drift apart."""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from redirect_logger.config import PURGE_ALLOWANCE, Settings, load_settings, port_of
from redirect_logger.limits import FD_MARGIN

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config" / "production.toml"
UNIT = ROOT / "config" / "systemd" / "redirect-logger.service"
KUBERNETES = ROOT / "config" / "kubernetes"
CONTAINERFILE = ROOT / "config" / "Containerfile"
# The oldest Kubernetes minor version the manifests claim, and the newest
# that kubernetes-validate ships schemas for.
KUBERNETES_VERSIONS = ("1.29", "1.37")
INSTALLED_BINARY = "/opt/redirect-logger/bin/redirect-logger"


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings(CONFIG)


def stop_allowance(settings: Settings) -> float:
    """What a stop may take, as config.py's grace_period check counts it."""
    server, shutdown = settings.server, settings.shutdown
    return (
        server.shutdown_delay + server.graceful_timeout + shutdown.flush_timeout + PURGE_ALLOWANCE
    )


def test_production_config_fits_its_stop_timeout(settings: Settings) -> None:
    assert stop_allowance(settings) == 23.0
    assert settings.shutdown.grace_period == 30.0
    assert settings.spill.enabled
    assert settings.server.admin_bind, "probes and load balancers need an admin port"


# --- systemd -------------------------------------------------------------


def unit_settings(text: str) -> dict[str, dict[str, list[str]]]:
    """The unit's sections, each key with its values in order (systemd keys repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (Debian package systemd)"
    return subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )


def verifiable_copy(text: str, tmp_path: Path) -> Path:
    """The unit with ExecStart's binary replaced by this virtualenv's
    `redirect-logger`: verify refuses a command that does not exist, and the
    unit names where docs/deployment.md installs it."""
    binary = Path(sys.executable).with_name("redirect-logger")
    assert binary.is_file(), f"{binary} is missing: pip install -e ."
    assert text.count(INSTALLED_BINARY) == 1
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(INSTALLED_BINARY, str(binary)), encoding="utf-8")
    return unit


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    result = verify(verifiable_copy(UNIT.read_text(encoding="utf-8"), tmp_path))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.parametrize(
    ("good", "bad", "complaint"),
    [
        ("KillMode=mixed", "KilMode=mixed", "Unknown key 'KilMode' in section [Service]"),
        ("TimeoutStopSec=30", "TimeoutStopSec=30 s.", "Failed to parse"),
    ],
)
def test_systemd_analyze_verify_reports_a_bad_line(
    tmp_path: Path, good: str, bad: str, complaint: str
) -> None:
    text = UNIT.read_text(encoding="utf-8")
    assert text.count(f"\n{good}\n") == 1
    result = verify(verifiable_copy(text.replace(f"\n{good}\n", f"\n{bad}\n"), tmp_path))
    # systemd ignores such a line and exits 0: the printed warning is the failure.
    assert complaint in result.stderr


def test_systemd_unit_matches_config(settings: Settings) -> None:
    service = unit_settings(UNIT.read_text(encoding="utf-8"))["Service"]
    assert float(service["TimeoutStopSec"][0]) == settings.shutdown.grace_period
    assert settings.shutdown.grace_period >= stop_allowance(settings)
    assert service["KillSignal"] == ["SIGTERM"]
    assert service["KillMode"] == ["mixed"]
    assert service["Restart"] == ["on-failure"]
    assert service["RestartPreventExitStatus"] == ["2"]
    state = Path("/var/lib") / service["StateDirectory"][0]
    assert Path(settings.spill.directory).is_relative_to(state)
    assert service["WorkingDirectory"] == [str(state)]
    argv = shlex.split(service["ExecStart"][0])
    assert argv[0] == INSTALLED_BINARY
    config = ["--config", "/etc/redirect-logger/config.toml"]
    assert argv[1:] == ["serve", *config, "--workers", "${WORKERS}"]
    assert service["Environment"] == ["WORKERS=2"]
    assert int(service["LimitNOFILE"][0]) >= 65536
    # each worker's connections, and its own descriptors (docs/deployment.md#file-descriptors)
    assert int(service["LimitNOFILE"][0]) >= settings.server.max_connections + FD_MARGIN
    assert service["ProtectSystem"] == ["strict"]
    assert service["NoNewPrivileges"] == ["yes"]


# --- Kubernetes ----------------------------------------------------------


def manifests() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    documents = []
    for name in kustomization["resources"]:
        documents += list(yaml.safe_load_all((KUBERNETES / name).read_text()))
    return documents


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [document for document in manifests() if document["kind"] == kind]


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    on_disk = {path.name for path in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(on_disk)
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in manifests())
    assert kinds == [
        ("ConfigMap", "redirect-logger-config"),
        ("PodDisruptionBudget", "redirect-logger"),
        ("Service", "redirect-logger"),
        ("Service", "redirect-logger-pods"),
        ("StatefulSet", "redirect-logger"),
    ]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(version: str) -> None:
    for document in manifests():
        # strict: the schemas that refuse properties they do not define
        assert kubernetes_validate.validate(document, version, strict=True) == version


@pytest.mark.parametrize(
    ("change", "path", "message"),
    [
        (
            lambda d: d["spec"]["template"]["spec"]["containers"][0].update(
                imagePullPolcy="Always"
            ),
            ["spec", "template", "spec", "containers", 0],
            "Additional properties are not allowed ('imagePullPolcy' was unexpected)",
        ),
        (
            lambda d: d["spec"].update(replicas="3"),
            ["spec", "replicas"],
            "'3' is not of type 'integer', 'null'",
        ),
        (
            lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=30.5),
            ["spec", "template", "spec", "terminationGracePeriodSeconds"],
            "30.5 is not of type 'integer', 'null'",
        ),
    ],
)
def test_schema_check_refuses_an_unknown_field_or_a_wrong_type(
    change: Any, path: list[str | int], message: str
) -> None:
    statefulset = copy.deepcopy(of_kind("StatefulSet")[0])
    change(statefulset)
    with pytest.raises(kubernetes_validate.ValidationError) as caught:
        kubernetes_validate.validate(statefulset, KUBERNETES_VERSIONS[-1], strict=True)
    assert (list(caught.value.path), caught.value.message) == (path, message)


def test_configmap_holds_the_production_config() -> None:
    (configmap,) = of_kind("ConfigMap")
    assert configmap["data"] == {"config.toml": CONFIG.read_text(encoding="utf-8")}


def test_statefulset_matches_config(settings: Settings) -> None:
    (statefulset,) = of_kind("StatefulSet")
    pod = statefulset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["terminationGracePeriodSeconds"] == settings.shutdown.grace_period
    assert "lifecycle" not in container, "shutdown_delay does what a preStop sleep would"

    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {
        "http": port_of(settings.server.bind[0]),
        "admin": port_of(settings.server.admin_bind[0]),
    }
    probes = {
        name: (container[name]["httpGet"]["path"], container[name]["httpGet"]["port"])
        for name in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes == {
        "startupProbe": ("/healthz", "admin"),
        "livenessProbe": ("/healthz", "admin"),
        "readinessProbe": ("/readyz?exclude=kafka", "admin"),
    }

    assert container["args"] == [
        "serve",
        "--config",
        "/etc/redirect-logger/config.toml",
        "--workers",
        "$(WORKERS)",
    ]
    workers = container["env"][0]
    assert workers["name"] == "WORKERS"
    assert workers["valueFrom"]["resourceFieldRef"] == {
        "containerName": container["name"],
        "resource": "requests.cpu",
        "divisor": "1",
    }

    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert mounts["config"] == "/etc/redirect-logger"
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "journal"
    assert Path(settings.spill.directory).is_relative_to(mounts["journal"])
    journal_bytes = parse_quantity(claim["spec"]["resources"]["requests"]["storage"])
    assert journal_bytes >= 2 * settings.spill.max_bytes  # a slot per worker

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def parse_quantity(text: str) -> int:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)", text)
    assert match, text
    return int(match[1]) << {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40}[match[2]]


def test_services_and_budget_select_the_pods(settings: Settings) -> None:
    (statefulset,) = of_kind("StatefulSet")
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert statefulset["spec"]["selector"]["matchLabels"] == labels
    services = {service["metadata"]["name"]: service["spec"] for service in of_kind("Service")}
    for spec in services.values():
        assert spec["selector"] == labels
    public = services["redirect-logger"]
    assert [port["targetPort"] for port in public["ports"]] == ["http"]
    headless = services[statefulset["spec"]["serviceName"]]
    assert headless["clusterIP"] == "None"
    assert [port["targetPort"] for port in headless["ports"]] == ["admin"]
    (budget,) = of_kind("PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"] == labels
    assert budget["spec"]["maxUnavailable"] == 1


# --- container image ------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """The Containerfile's instructions (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0], line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_containerfile_matches_config(settings: Settings) -> None:
    final_stage = instructions()
    starts = [i for i, (op, _) in enumerate(final_stage) if op == "FROM"]
    final_stage = final_stage[starts[-1] :]
    ops: dict[str, list[str]] = {}
    for op, argument in final_stage:
        ops.setdefault(op, []).append(argument)
    assert ops["STOPSIGNAL"] == ["SIGTERM"]
    expected_ports = {port_of(settings.server.bind[0]), port_of(settings.server.admin_bind[0])}
    assert {int(port) for port in ops["EXPOSE"][0].split()} == expected_ports
    (statefulset,) = of_kind("StatefulSet")
    pod_security = statefulset["spec"]["template"]["spec"]["securityContext"]
    assert ops["USER"] == [f"{pod_security['runAsUser']}:{pod_security['runAsGroup']}"]
    assert Path(settings.spill.directory).is_relative_to(ops["VOLUME"][0])
    assert "COPY config/production.toml /etc/redirect-logger/config.toml" in [
        f"COPY {argument}" for argument in ops["COPY"]
    ]
    assert ops["ENTRYPOINT"] == ['["redirect-logger"]']
    assert ops["CMD"] == [
        '["serve", "--config", "/etc/redirect-logger/config.toml", "--workers", "2"]'
    ]


def test_build_context_admits_what_the_containerfile_copies() -> None:
    admitted = {
        line[1:]
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.startswith("!")
    }
    copied = set()
    for op, argument in instructions():
        if op == "COPY" and not argument.startswith("--from"):
            copied.update(argument.split()[:-1])
    assert copied == admitted
    for source in copied:
        assert (ROOT / source).exists(), source
    # pip builds the project from these: the readme is part of its metadata
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["readme"] in copied
