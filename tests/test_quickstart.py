"""The README's quickstart: serve on config/quickstart.toml with --dev-broker, curl, tail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import trio

from brokers import free_port
from support import ROOT, ServiceProcess, ledger_counts


async def test_quickstart_serves_and_tail_shows_the_record(tmp_path: Path) -> None:
    quickstart = (ROOT / "config" / "quickstart.toml").read_text()
    assert '"bootstrap.servers" = "127.0.0.1:19092"' in quickstart
    config = tmp_path / "quickstart.toml"  # the same file on free ports
    config.write_text(quickstart.replace("127.0.0.1:19092", f"127.0.0.1:{free_port()}"))
    service = ServiceProcess.cli(config, "--dev-broker", "--bind", "127.0.0.1:0")
    try:
        url = await trio.to_thread.run_sync(service.url)
        async with httpx.AsyncClient(base_url=url) as client:
            response = await client.get("/docs/start?utm_source=readme")
        assert response.status_code == 302
        assert response.headers["location"] == "https://docs.example.com/start?utm_source=readme"
        tail = await trio.to_thread.run_sync(
            lambda: subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "redirect_logger.cli",
                    "tail",
                    "--config",
                    str(config),
                    "--from-beginning",
                    "--count",
                    "1",
                    "--idle-timeout",
                    "20",
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        )
        assert tail.returncode == 0, tail.stderr
        [line] = tail.stdout.splitlines()
        record = json.loads(line)
        assert (record["id"], record["rule"], record["path"], record["query"]) == (
            response.headers["x-hit-id"],
            "docs",
            "/docs/start",
            "utm_source=readme",
        )
        code = await trio.to_thread.run_sync(service.terminate)
    finally:
        service.kill()
    assert code == 0, service.output
    assert service.ledgers() == [ledger_counts(received=1, delivered=1)]
