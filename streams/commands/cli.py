"""`messenger-streams`: the command line (worker, inspect, topics, simulate, summary, …).

Every user error (bad config, a bad MESSENGER_STREAMS_* value, bad input, an unreachable broker)
is one line on stderr and exit status 2; no tracebacks. The environment is checked before any
command runs: every variable against the Settings catalogue (streams/core/settings.py), and an
unknown MESSENGER_STREAMS_* variable is a warning naming the closest known one.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from aiokafka.errors import KafkaError

from streams.commands import dlq, history, pages, simulate, summary
from streams.core import serde
from streams.core.config import ConfigError, ConnectorConfig, load_config
from streams.core.process import CliError
from streams.core.settings import Settings, load_settings, unknown_variables
from streams.edges import admin, dispatch, media, webhook
from streams.rules.normalize import split_body

EXIT_USAGE = 2


def _fail(message: str) -> int:
    print(f"messenger-streams: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _load() -> tuple[Settings, ConnectorConfig]:
    return load_settings(), load_config()


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        raw = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {args.file}: {exc.strerror}") from None
    result = split_body(raw, max_bytes=args.max_bytes)
    out = sys.stdout.buffer
    for ev in result.events:
        out.write(serde.dumps(ev) + b"\n")
    out.flush()
    if result.rejected:
        for rej in result.rejected:
            where = f"{rej.item_index}: " if rej.item_index else ""
            print(f"messenger-streams: error: {rej.reason}: {where}{rej.error}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    # Faust is imported here, not at the top: importing it fixes the event loop, which only
    # cmd_worker may choose (see cmd_worker). The pipeline is needed for its tables' changelogs.
    from streams.stages.app import create_pipeline
    from streams.stages.startup import prepare_topics, remove_topics

    settings, config = _load()
    pipe = create_pipeline(settings, config)
    if args.topics_command == "delete":
        if not args.yes:
            raise CliError("topics delete removes every topic of this app id and prefix with its data: add --yes")
        for name in asyncio.run(remove_topics(pipe)):
            print(f"deleted {name}")
        return 0
    created = asyncio.run(prepare_topics(pipe))
    for name in created:
        print(f"created {name}")
    if not created:
        print("all topics exist")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    settings, config = _load()
    if args.rate < 0:
        raise CliError("--rate must be >= 0")
    count = args.count if args.count and args.count > 0 else None
    duration = args.duration if args.duration and args.duration > 0 else None
    if count is None and duration is None and args.rate == 0:
        raise CliError("unbounded and unthrottled: give --count, --duration or --rate")
    try:
        sent = asyncio.run(
            simulate.run_simulation(
                settings,
                config,
                rate=args.rate,
                count=count,
                duration=duration,
                agents=not args.no_agents,
                invalid_ratio=args.invalid_ratio,
                consumers=args.consumers,
                seed=args.seed,
            )
        )
    except KeyboardInterrupt:
        return 130
    print(f"simulate: sent {sent} records")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise CliError("--interval must be > 0")
    settings = load_settings()
    url = args.url or settings.summary_url or f"http://127.0.0.1:{settings.web_port}/metrics"
    return summary.run_summary(url, interval=args.interval, once=args.once)


def cmd_worker(args: argparse.Namespace, extra: list[str]) -> int:
    if not args.no_uvloop:
        # faust picks its loop when first imported: choose uvloop before anything imports faust
        import mode.loop

        mode.loop.use("uvloop")
    # only now: they import faust, which fixes the loop
    from streams.stages.app import create_pipeline
    from streams.stages.startup import run_worker

    settings, config = _load()
    pipe = create_pipeline(settings, config)
    return run_worker(pipe, loop="aio" if args.no_uvloop else "uvloop", extra_args=extra)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="messenger-streams",
        description="Facebook Messenger connector core on Faust and Kafka. Configuration: the TOML file in "
        "MESSENGER_STREAMS_CONFIG; Kafka: KAFKA_BOOTSTRAP_SERVERS (default 127.0.0.1:9092).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("worker", help="run a processor worker (extra options go to the Faust worker)")
    p.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")

    p = sub.add_parser("inspect", help="print the normalized events of one webhook body as JSON lines")
    p.add_argument("file", help="a file holding one webhook POST body, or - for stdin")
    p.add_argument("--max-bytes", type=int, default=1_048_576, help="body size limit (default 1 MiB)")

    p = sub.add_parser("topics", help="manage the processor's topics")
    tsub = p.add_subparsers(dest="topics_command", metavar="ACTION")
    tsub.required = True
    tsub.add_parser("create", help="create every topic the worker uses, changelogs included (existing ones are "
                    "kept; a wrong partition count is refused)")
    p = tsub.add_parser("delete", help="delete every topic of this app id and prefix, data included (needs --yes)")
    p.add_argument("--yes", action="store_true", help="really delete")

    p = sub.add_parser("simulate", help="produce realistic Messenger and agent traffic")
    p.add_argument("--rate", type=float, default=20.0, help="records per second, 0 for as fast as possible")
    p.add_argument("--count", type=int, default=0, help="stop after this many records (0: no limit)")
    p.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: no limit)")
    p.add_argument("--consumers", type=int, default=30, help="simulated people writing to the pages")
    p.add_argument("--invalid-ratio", type=float, default=0.01, help="share of deliberately broken bodies")
    p.add_argument("--no-agents", action="store_true", help="webhook traffic only, no agent actions")
    p.add_argument("--seed", type=int, default=7)

    # --- webhook / dispatch: argument definitions live in their modules (streams/webhook.py, dispatch.py)
    p = sub.add_parser("webhook", help="serve Meta's webhook (verify, check signatures) and write to Kafka")
    webhook.add_arguments(p)
    p = sub.add_parser("dispatch", help="send messenger.outbound requests to the Graph API Send endpoint")
    dispatch.add_arguments(p)

    p = sub.add_parser("media", help="keep inbound attachments: download them before their URLs expire (#17)")
    media.add_arguments(p)

    p = sub.add_parser("dlq", help="show the dead letters, or replay their original bytes")
    dlq.add_arguments(p)

    p = sub.add_parser("history", help="conversation history in PostgreSQL: sink, export, forget, migrate, retain")
    history.add_arguments(p)

    # --- #14 onboarding: the page directory from scripts, and the admin web page
    p = sub.add_parser("pages", help="connect, change, switch and list Facebook pages (live, through Kafka)")
    pages.add_arguments(p)
    p = sub.add_parser("admin", help="serve the onboarding admin page (binds 127.0.0.1 by default)")
    admin.add_arguments(p)

    p = sub.add_parser("summary", help="a live summary from a worker's /metrics (redrawn in place on a terminal)")
    p.add_argument("--url", default=None, help="the worker's metrics URL (default: env MESSENGER_STREAMS_SUMMARY_URL, "
                   "else http://127.0.0.1:$MESSENGER_STREAMS_WEB_PORT/metrics)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between screens (default 2)")
    p.add_argument("--once", action="store_true", help="print one summary and exit (2 if the worker does not answer)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `messenger-streams` console script."""
    for warning in unknown_variables(os.environ):
        print(f"messenger-streams: warning: {warning}", file=sys.stderr)
    try:
        settings = load_settings()  # every variable, before the parser reads any of them as a default
    except ConfigError as exc:
        return _fail(str(exc))
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    extra: list[str] = []
    if args_list[:1] == ["worker"]:
        known = [a for a in args_list[1:] if a in ("--no-uvloop", "-h", "--help")]
        extra = [a for a in args_list[1:] if a not in known]
        args_list = ["worker", *known]
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.command not in ("worker", "webhook", "dispatch"):  # those log for themselves
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # our one line says it
    try:
        return _run(args, extra)
    except (ConfigError, CliError) as exc:
        return _fail(str(exc))
    except (KafkaError, ConnectionError, TimeoutError) as exc:
        detail = " ".join(str(exc).split()).removeprefix(f"{type(exc).__name__}: ")
        if type(exc).__module__ != "builtins" and not isinstance(exc, KafkaError) and detail:
            return _fail(detail)  # ours (TopicError, MirrorError, …) say what and where
        return _fail(f"cannot reach Kafka at {settings.bootstrap_servers}: {type(exc).__name__}"
                     f"{': ' + detail if detail else ''}")
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace, extra: list[str]) -> int:
    if args.command == "inspect":
        return cmd_inspect(args)
    if args.command == "topics":
        return cmd_topics(args)
    if args.command == "simulate":
        return cmd_simulate(args)
    if args.command == "summary":
        return cmd_summary(args)
    if args.command == "webhook":
        return webhook.run(args)
    if args.command == "dispatch":
        return dispatch.run(args)
    if args.command == "dlq":
        return dlq.run(args)
    if args.command == "history":
        return history.run(args)
    if args.command == "media":
        return media.run(args)
    if args.command == "pages":
        return pages.run(args)
    if args.command == "admin":
        return admin.run(args)
    return cmd_worker(args, extra)


if __name__ == "__main__":
    sys.exit(main())
