"""``redirect-logger``: serve, check, replay, tail.

Exit codes: 0 ok; 1 runtime failure (cannot bind, broker error); 2 invalid
config or usage; 3 records were lost (failed) at shutdown. ``replay`` exits 1
when records remain journaled.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import trio
from hypercorn.trio import serve

from . import __version__
from .app import create_app
from .config import ConfigError, Settings, load_settings, parse_settings
from .devbroker import DevBrokerError, run_dev_broker
from .limits import descriptor_shortfall
from .logs import configure_logging
from .routing import routing_warnings
from .server import hypercorn_config, leaf_errors
from .service import Service
from .steps import StepTrace
from .supervisor import supervise, watch_supervisor, worker_fds

log = logging.getLogger("redirect_logger.cli")

EXIT_FAILURE = 1
EXIT_CONFIG = 2


async def _watch_signals(
    stop: trio.Event,
    reload: Callable[[], Awaitable[None]] | None = None,
    *,
    worker: bool = False,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """SIGTERM and SIGINT set ``stop``; SIGHUP calls ``reload``. A supervised
    ``worker`` leaves SIGINT ignored: its supervisor sends SIGTERM."""
    handled = [signal.SIGTERM, signal.SIGHUP]
    if not worker:
        handled.append(signal.SIGINT)
    with trio.open_signal_receiver(*handled) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                if reload is None:
                    log.warning("SIGHUP: no config file to reload")
                else:
                    await reload()
                continue
            if stop.is_set():
                log.warning("%s again: the drain is already bounded by flush_timeout", name)
                continue
            log.info("%s: not ready, stopping the listeners, draining", name)
            stop.set()


async def _until_stopped(service: Service, stop: trio.Event) -> None:
    """Hypercorn's shutdown trigger: readiness turns false ``shutdown_delay`` s before
    the listeners close, so that a load balancer can stop sending first."""
    await stop.wait()
    service.draining = True
    await trio.sleep(service.settings.server.shutdown_delay)


async def _reload(service: Service, path: Path) -> None:
    """Re-read the config file and swap in its rules; an invalid file keeps the
    rules in use, and the log says why."""
    try:
        settings = await trio.to_thread.run_sync(load_settings, path)
        service.use_rules(settings)
    except ConfigError as exc:
        log.error("SIGHUP: reload refused, the rules in use stay: %s", exc)


async def serve_service(
    settings: Settings,
    *,
    config_path: Path | None = None,
    dev_broker: bool = False,
    stop: trio.Event | None = None,
    fds: Sequence[int] | None = None,
    task_status: trio.TaskStatus[Service] = trio.TASK_STATUS_IGNORED,
) -> int:
    """The root nursery of ``serve``: signals, dev broker, pipeline, Hypercorn.

    SIGTERM or SIGINT (or setting ``stop``) starts the shutdown; SIGHUP
    reloads the rules from ``config_path``. Returns the
    exit code once the server has stopped and the pipeline has drained.
    Reports the running Service as started (its ``binds`` are the addresses).
    With ``fds`` it is a worker of ``serve --workers N``: it serves the
    supervisor's listening sockets, and stops if the supervisor dies.
    """
    service = Service(settings)
    app = create_app(service, own_lifecycle=False)
    stop = trio.Event() if stop is None else stop
    async with trio.open_nursery() as root:
        reload = partial(_reload, service, config_path) if config_path is not None else None
        await root.start(partial(_watch_signals, stop, reload, worker=fds is not None))
        if fds is not None:
            root.start_soon(watch_supervisor, stop, os.getppid())
        if dev_broker:
            await root.start(run_dev_broker, str(settings.kafka["bootstrap.servers"]))
        config = hypercorn_config(settings, fds)
        if settings.logging.format == "json":  # Hypercorn's lines in the same format
            config.errorlog = logging.getLogger("redirect_logger.hypercorn")
        async with service.running(), trio.open_nursery() as server:
            binds = await server.start(
                partial(
                    serve,
                    app,
                    config,
                    shutdown_trigger=partial(_until_stopped, service, stop),
                )
            )
            service.listening(binds)
            log.info("serving on %s", " ".join(service.binds))
            if service.admin_binds:
                log.info("admin endpoints on %s", " ".join(service.admin_binds))
            task_status.started(service)
        root.cancel_scope.cancel()
    return service.exit_code()


def _load(path: str) -> Settings | None:
    """The settings, with logging set up as their ``[logging]`` says; None
    (the error printed) if the file cannot be used."""
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    configure_logging(settings.logging)
    return settings


def _listen_error(settings: Settings, error: OSError) -> str:
    """An error binding the listeners, with the addresses: the OSError alone
    ("Address already in use") does not say which key to look at."""
    if error.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
        return str(error)
    server = settings.server
    keys = "server.bind, server.admin_bind" if server.admin_bind else "server.bind"
    return f"cannot listen on {' '.join([*server.bind, *server.admin_bind])} ({keys}): {error}"


def _cmd_serve(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if settings is None:
        return EXIT_CONFIG
    if args.bind:
        data = settings.model_dump(mode="json")
        data["server"]["bind"] = args.bind
        try:
            settings = parse_settings(data, "--bind")
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    if args.workers:
        argv = ["--config", args.config]
        for bind in args.bind or []:
            argv += ["--bind", bind]
        argv += ["--trace-steps"] * args.trace_steps
        run = partial(supervise, settings, argv, args.workers, dev_broker=args.dev_broker)
    else:
        run = partial(
            serve_service,
            settings,
            config_path=Path(args.config),
            dev_broker=args.dev_broker,
            fds=worker_fds(),
        )
    trace = StepTrace() if args.trace_steps and not args.workers else None
    try:
        return trio.run(run, instruments=[trace] if trace else [])
    except OSError as exc:  # the supervisor's binding
        print(f"error: {_listen_error(settings, exc)}", file=sys.stderr)
        return EXIT_FAILURE
    except BaseExceptionGroup as group:
        config_errors, other = group.split(ConfigError)
        startup_errors, other = other.split((OSError, DevBrokerError)) if other else (None, None)
        if other is not None:
            raise
        for failed in (config_errors, startup_errors):
            for error in leaf_errors(failed) if failed is not None else []:
                shown = _listen_error(settings, error) if isinstance(error, OSError) else error
                print(f"error: {shown}", file=sys.stderr)
        return EXIT_CONFIG if config_errors else EXIT_FAILURE
    finally:
        if trace is not None:
            log.info("%s", trace.report())


def _cmd_check(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if settings is None:
        return EXIT_CONFIG
    from confluent_kafka import KafkaException, Producer

    try:  # librdkafka knows its own properties; creating a producer checks them.
        Producer({**settings.kafka, "logger": logging.getLogger("redirect_logger.check")})
    except KafkaException as exc:
        print(f"error: {args.config}: kafka: {exc.args[0].str()}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as exc:  # a value of the wrong type for a property
        print(f"error: {args.config}: kafka: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    shortfall = descriptor_shortfall(settings.server)
    if shortfall is not None:
        print(f"warning: {args.config}: {shortfall}", file=sys.stderr)
    for warning in routing_warnings(settings.rules):
        print(f"warning: {args.config}: {warning}", file=sys.stderr)
    sys.stdout.write(orjson.dumps(settings.redacted(), option=orjson.OPT_INDENT_2).decode())
    sys.stdout.write("\n")
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    """Replay every journal no running process holds, with a progress bar."""
    settings = _load(args.config)
    if settings is None:
        return EXIT_CONFIG
    if not settings.spill.enabled:
        print(f"error: {args.config}: spill.enabled is false: no journal", file=sys.stderr)
        return EXIT_CONFIG
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .ledger import Ledger
    from .replay import Replayer

    ledger = Ledger()
    try:
        replayer = Replayer(settings.kafka, settings.spill, ledger, None, rate=args.rate)
    except ConfigError as exc:
        print(f"error: {args.config}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for slot in replayer.held_slots():
        print(f"{slot}: in use by a running service, which replays it itself", file=sys.stderr)
    total = replayer.count()
    if not total:
        print(f"nothing to replay in {settings.spill.directory}", file=sys.stderr)
        return 0
    if not replayer.wait_reachable(args.timeout):
        print(
            f"error: no Kafka broker reachable within {args.timeout} s; {total} records stay "
            "journaled",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    # Log lines are written above the bar, never into it (one line each).
    with (
        logging_redirect_tqdm([logging.getLogger("redirect_logger")]),
        tqdm(total=total, unit="rec", desc="replay", file=sys.stderr) as bar,
    ):
        done = replayer.replay_all(bar.update)
    left = replayer.count()
    print(f"replayed {ledger.replayed} records; {left} still journaled", file=sys.stderr)
    return 0 if done and not left else EXIT_FAILURE


def _tail_config(settings: Settings) -> dict[str, Any]:
    config: dict[str, Any] = settings.consumer_kafka()
    config.update(
        {
            "group.id": f"redirect-logger-tail-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "logger": logging.getLogger("redirect_logger.librdkafka"),
        }
    )
    return config


def _cmd_tail(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if settings is None:
        return EXIT_CONFIG
    from confluent_kafka import KafkaError, KafkaException

    try:
        return _tail(settings, args)
    except KafkaException as exc:
        print(f"error: {args.config}: kafka: {exc.args[0].str()}", file=sys.stderr)
        invalid = exc.args[0].code() == KafkaError._INVALID_ARG
        return EXIT_CONFIG if invalid else EXIT_FAILURE


def _tail(settings: Settings, args: argparse.Namespace) -> int:
    """Print the topics' records as JSON lines until --count, --idle-timeout or Ctrl+C."""
    from confluent_kafka import (
        OFFSET_BEGINNING,
        OFFSET_END,
        Consumer,
        KafkaException,
        TopicPartition,
    )

    if args.all_topics:
        pending = settings.topics()
    else:
        pending = list(dict.fromkeys(args.topic or [settings.records.topic]))
    consumer = Consumer(_tail_config(settings))
    start = OFFSET_BEGINNING if args.from_beginning else OFFSET_END
    printed = 0
    assigned = False
    last_activity = next_look = time.monotonic()

    def idle() -> bool:
        limit: float | None = args.idle_timeout
        return limit is not None and time.monotonic() - last_activity > limit

    try:
        while args.count is None or printed < args.count:
            # A topic may not exist yet, or no broker answer yet: look again
            # every 0.5 s, and assign each topic's partitions once it is there.
            if pending and time.monotonic() >= next_look:
                try:
                    topics = consumer.list_topics(timeout=5).topics
                except KafkaException as exc:
                    log.warning("no metadata for %s yet: %s", ", ".join(pending), exc.args[0].str())
                    topics = {}
                found = [
                    TopicPartition(topic, partition, start)
                    for topic in pending
                    if (metadata := topics.get(topic)) is not None and metadata.error is None
                    for partition in sorted(metadata.partitions)
                ]
                if found:
                    consumer.incremental_assign(found)
                    assigned = True
                    seen = {partition.topic for partition in found}
                    pending = [topic for topic in pending if topic not in seen]
                next_look = time.monotonic() + 0.5
            if not assigned:
                if idle():
                    break
                time.sleep(0.5)
                continue
            message = consumer.poll(0.5)
            if message is None:
                if idle():
                    break
                continue
            error, value = message.error(), message.value()
            if error is not None or value is None:
                reason = error.str() if error else "record without a value"
                print(f"error: {reason}", file=sys.stderr)
                continue
            sys.stdout.write(value.decode("utf-8", "backslashreplace") + "\n")
            sys.stdout.flush()
            printed += 1
            last_activity = time.monotonic()
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return 0


def _cmd_top(args: argparse.Namespace) -> int:
    from .top import run

    configure_logging()

    return run(args.admin, args.interval)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not > 0")
    return value


def _topic(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("a topic name cannot be empty")
    return text


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not 1 or more")
    return value


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 256:
        raise argparse.ArgumentTypeError(f"{text} is not between 1 and 256")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="redirect-logger",
        description="Answer every request with a redirect; log every hit to Kafka.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve_cmd = commands.add_parser("serve", help="run the service")
    serve_cmd.add_argument("--config", required=True, help="TOML config file")
    serve_cmd.add_argument(
        "--bind",
        action="append",
        metavar="HOST:PORT",
        help="listen here instead of server.bind (repeatable)",
    )
    serve_cmd.add_argument(
        "--workers",
        type=_workers,
        metavar="N",
        help="run N worker processes on the same sockets, under a supervisor "
        "(default: one process, no supervisor)",
    )
    serve_cmd.add_argument(
        "--dev-broker",
        action="store_true",
        help="also run the embedded memory-only broker on kafka.bootstrap.servers",
    )
    serve_cmd.add_argument(
        "--trace-steps",
        action="store_true",
        help="time every Trio task step and log the longest at exit (a diagnostic: "
        "about 1 us a step)",
    )
    serve_cmd.set_defaults(run=_cmd_serve)

    check_cmd = commands.add_parser("check", help="validate and print the effective config")
    check_cmd.add_argument("--config", required=True)
    check_cmd.set_defaults(run=_cmd_check)

    replay_cmd = commands.add_parser(
        "replay", help="deliver the spill journal's records to Kafka now, with progress"
    )
    replay_cmd.add_argument("--config", required=True)
    replay_cmd.add_argument(
        "--rate", type=_positive, help="records/s at most (default: as fast as Kafka takes them)"
    )
    replay_cmd.add_argument(
        "--timeout", type=_positive, default=30.0, help="s to wait for a broker (default 30)"
    )
    replay_cmd.set_defaults(run=_cmd_replay)

    tail_cmd = commands.add_parser("tail", help="print records from the topics as JSON lines")
    tail_cmd.add_argument("--config", required=True)
    topics = tail_cmd.add_mutually_exclusive_group()
    topics.add_argument(
        "--topic",
        action="append",
        type=_topic,
        metavar="NAME",
        help="read this topic (repeatable; default: records.topic)",
    )
    topics.add_argument(
        "--all-topics",
        action="store_true",
        help="read every topic the config can write to: records.topic, the rules', "
        "the fallback's, collect.topic, collect.bad_topic",
    )
    tail_cmd.add_argument("--from-beginning", action="store_true")
    tail_cmd.add_argument(
        "--count", type=_count, metavar="N", help="stop after N records (1 or more)"
    )
    tail_cmd.add_argument(
        "--idle-timeout",
        type=_positive,
        metavar="S",
        help="stop after S seconds (> 0) without a record",
    )
    tail_cmd.set_defaults(run=_cmd_tail)

    top_cmd = commands.add_parser("top", help="live view of a running service's /metrics")
    top_cmd.add_argument(
        "--admin", required=True, metavar="URL", help="its admin address: http://HOST:PORT"
    )
    top_cmd.add_argument(
        "--interval", type=_positive, default=1.0, help="s between scrapes (default 1)"
    )
    top_cmd.set_defaults(run=_cmd_top)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("redirect_logger.check").setLevel(logging.CRITICAL)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
