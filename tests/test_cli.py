"""``redirect-logger --version``."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from redirect_logger import __version__
from support import ROOT


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "redirect_logger.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )


def test_version_prints_the_package_version_and_exits_0() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert __version__ == pyproject["project"]["version"]
    for args in (["--version"], ["--version", "serve"]):  # no command, no config needed
        result = _cli(*args)
        assert (result.returncode, result.stdout, result.stderr) == (
            0,
            f"redirect-logger {__version__}\n",
            "",
        )
