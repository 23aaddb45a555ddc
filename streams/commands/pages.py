"""`messenger-streams pages`: connect, change, switch and list Facebook pages from a script.

    messenger-streams pages keygen                                  # a key for MESSENGER_STREAMS_PAGES_KEY
    messenger-streams pages connect < user_token                    # list the pages that user administers
    messenger-streams pages connect --page 1691462197845448=billing < user_token
    messenger-streams pages set 1691462197845448 --skill billing [--name N] [--locale L] [--token-stdin]
    messenger-streams pages enable|disable|disconnect 1691462197845448
    messenger-streams pages account [--source on|off] [--mode manual] [--default-skill general] ...
    messenger-streams pages list [--json]

They talk only to Kafka (`connector.pages`) and, where a step needs it, the Graph API, so they work
while workers and dispatchers run: a change is live everywhere within seconds. Tokens are read from
standard input (never from the command line), stored encrypted, and never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

from schemas.pages import PageActivity
from streams.core.config import ConfigError, load_config
from streams.core.mirror import MirrorError, TopicMirror
from streams.core.pages import PageDirectory, PagesError, PagesWriter, actor, decode_activity, ensure_activity_topic
from streams.core.process import CliError
from streams.core.settings import Settings, load_settings
from streams.core.tokens import Secret, generate_key, load_app_secret, load_cipher
from streams.edges.graph import DEFAULT_API_VERSION, DEFAULT_GRAPH_URL, GraphClient, GraphError
from streams.edges.onboarding import Onboarding, OnboardingError, Report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    sub = parser.add_subparsers(dest="pages_command", metavar="ACTION")
    sub.required = True
    sub.add_parser("keygen", help="print a new key for MESSENGER_STREAMS_PAGES_KEY")
    p = sub.add_parser("list", help="every page: status, skill, last event and last send")
    p.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    p = sub.add_parser("connect", help="read a user access token from stdin, list or connect that user's pages")
    p.add_argument("--page", action="append", default=[], metavar="PAGE_ID=SKILL",
                   help="connect this page to this skill (repeatable); without it, list the pages")
    p.add_argument("--locale", default=None, help="locale of the pages connected (default en_US)")
    p = sub.add_parser("set", help="add or change a page (its token from stdin with --token-stdin)")
    p.add_argument("page_id")
    p.add_argument("--skill", default=None)
    p.add_argument("--name", default=None)
    p.add_argument("--locale", default=None)
    p.add_argument("--token-stdin", action="store_true", help="read the page access token from stdin")
    for name, text in (("enable", "switch a page on"), ("disable", "switch a page off (its events are dead-lettered)"),
                       ("disconnect", "unsubscribe the app from a page and forget its token")):
        p = sub.add_parser(name, help=text)
        p.add_argument("page_id")
    p = sub.add_parser("account", help="change the account settings (live)")
    p.add_argument("--source", choices=["on", "off"], default=None, help="the Activate Facebook source toggle")
    p.add_argument("--mode", choices=["entry_point", "manual"], default=None)
    p.add_argument("--default-skill", default=None)
    p.add_argument("--unknown-pages", choices=["default_skill", "dead_letter"], default=None)
    p.add_argument("--agent-id", default=None, help="external user's agent id")
    p.add_argument("--nickname", default=None, help="external user's nickname")
    for p in sub.choices.values():
        p.add_argument("--graph-url", default=env("MESSENGER_STREAMS_GRAPH_URL", DEFAULT_GRAPH_URL),
                       help="Graph API base URL (env MESSENGER_STREAMS_GRAPH_URL)")
        p.add_argument("--api-version", default=env("MESSENGER_STREAMS_GRAPH_API_VERSION", DEFAULT_API_VERSION))
        p.add_argument("--app-secret-file", default=None, help="file holding the App Secret "
                       "(default: env MESSENGER_STREAMS_APP_SECRET_FILE or MESSENGER_STREAMS_APP_SECRET)")


def read_secret(what: str) -> Secret:
    """One token from stdin (a prompt without echo on a terminal); never from the command line."""
    if sys.stdin.isatty():
        value = getpass.getpass(f"{what}: ")
    else:
        value = sys.stdin.readline()
    value = value.strip()
    if not value:
        raise CliError(f"no {what} on standard input")
    return Secret(value)


def _fmt_ms(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


async def read_activity(settings: Settings, timeout: float = 15.0) -> dict[tuple[str, str], PageActivity]:
    """Everything `connector.pages.activity` holds: (kind, page_id) → latest note."""
    await ensure_activity_topic(settings, timeout)
    mirror: TopicMirror[PageActivity] = TopicMirror(
        settings.bootstrap_servers, settings.topics.name("pages_activity"), decode_activity
    )
    try:
        await mirror.start(timeout)
        await mirror.wait_ready(timeout)
    except MirrorError as exc:
        raise PagesError(str(exc)) from None
    finally:
        await mirror.stop()
    return {(a.kind, a.page_id): a for _, a in mirror.items()}


def listing(directory: PageDirectory, activity: dict[tuple[str, str], PageActivity]) -> dict[str, Any]:
    """The `pages list --json` document: account settings and every page with its last event / send."""
    acc = directory.account
    pages = []
    for v in directory.views():
        doc = v.as_dict()
        ev = activity.get(("event", v.page_id))
        snd = activity.get(("send", v.page_id))
        doc["last_event_at"] = ev.at if ev else None
        doc["last_send_at"] = snd.at if snd else None
        doc["last_send_result"] = snd.result if snd else None
        pages.append(doc)
    return {
        "account": {
            "active": acc.active, "mode": acc.mode, "default_skill": acc.default_skill,
            "unknown_pages": acc.unknown_pages, "external_agent_id": acc.external_agent_id,
            "external_nickname": acc.external_nickname,
        },
        "pages": pages,
    }


def print_table(doc: dict[str, Any]) -> None:
    acc = doc["account"]
    print(f"Facebook source: {'on' if acc['active'] else 'OFF'}; routing {acc['mode']}, default skill "
          f"{acc['default_skill']}, unknown pages -> {acc['unknown_pages']}; external user "
          f"{acc['external_agent_id']} ({acc['external_nickname']})")
    rows = [("PAGE", "NAME", "SKILL", "STATUS", "TOKEN", "LAST EVENT", "LAST SEND")]
    for p in doc["pages"]:
        send = _fmt_ms(p["last_send_at"]) + (f" ({p['last_send_result']})" if p["last_send_result"] else "")
        rows.append((p["page_id"], p["name"] or "-", p["skill"] or "-", p["status"],
                     "stored" if p["token"] else ("file" if p["source"] == "config" else "-"),
                     _fmt_ms(p["last_event_at"]), send))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _graph(args: argparse.Namespace, app_id: str, required: bool) -> GraphClient | None:
    secret = load_app_secret(args.app_secret_file)
    if secret is None:
        if required:
            raise CliError("no app secret: set MESSENGER_STREAMS_APP_SECRET (or --app-secret-file); "
                           "every Graph call carries appsecret_proof")
        return None
    if not args.graph_url.startswith(("http://", "https://")):
        raise CliError(f"--graph-url must be an http(s) URL, got {args.graph_url!r}")
    return GraphClient(app_id, secret, graph_url=args.graph_url, api_version=args.api_version)


def _finish(reports: list[Report]) -> int:
    failed = False
    for r in reports:
        if r.ok:
            print(r.line())
        else:
            failed = True
            print(f"messenger-streams: error: {r.line()}", file=sys.stderr)
    return 2 if failed else 0


async def _run(args: argparse.Namespace) -> int:
    settings = load_settings()
    config = load_config()
    cmd = args.pages_command
    needs_token = cmd == "connect" or (cmd == "set" and args.token_stdin)
    token = read_secret("user access token" if cmd == "connect" else "page access token") if needs_token else None
    graph = _graph(args, config.account.app_id, required=needs_token)
    cipher = load_cipher(required=needs_token)
    directory = PageDirectory(config, settings)
    writer = PagesWriter(settings)
    try:
        await directory.start()
        if cmd == "list":
            doc = listing(directory, await read_activity(settings))
            if args.json:
                sys.stdout.buffer.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
            else:
                print_table(doc)
            return 0
        await writer.start()
        ob = Onboarding(directory, writer, by=actor("cli"), graph=graph, cipher=cipher)
        if cmd == "connect":
            assert token is not None and graph is not None  # noqa: S101 - needs_token
            return await _connect(ob, graph, token, args)
        if cmd == "set":
            if token is not None:
                report = await ob.connect(args.page_id, args.skill, token, name=args.name, locale=args.locale)
            else:
                report = await ob.set_page(args.page_id, skill=args.skill, name=args.name, locale=args.locale)
            return _finish([report])
        if cmd in ("enable", "disable"):
            return _finish([await ob.enable(args.page_id, cmd == "enable")])
        if cmd == "disconnect":
            return _finish([await ob.disconnect(args.page_id)])
        if cmd == "account":
            try:
                rec = await ob.set_account(
                    active=None if args.source is None else args.source == "on", mode=args.mode,
                    default_skill=args.default_skill, unknown_pages=args.unknown_pages,
                    external_agent_id=args.agent_id, external_nickname=args.nickname,
                )
            except OnboardingError as exc:
                raise CliError(str(exc)) from None
            print(f"account: source {'on' if rec.active else 'off'}, routing {rec.mode}, default skill "
                  f"{rec.default_skill}, unknown pages -> {rec.unknown_pages}, external user "
                  f"{rec.external_agent_id} ({rec.external_nickname})")
            return 0
        raise CliError(f"unknown pages action {cmd}")
    finally:
        await writer.stop()
        await directory.stop()
        if graph is not None:
            await graph.close()


async def _connect(ob: Onboarding, graph: GraphClient, user_token: Secret, args: argparse.Namespace) -> int:
    try:
        try:
            user_token = await graph.long_lived(user_token)
        except GraphError as exc:
            raise CliError(f"cannot exchange the user token for a long-lived one: {exc}") from None
        pages = await graph.pages(user_token)
    except GraphError as exc:
        raise CliError(f"cannot list the user's pages (/me/accounts): {exc}") from None
    wanted: dict[str, str] = {}
    for item in args.page:
        page_id, sep, skill = item.partition("=")
        if not sep or not page_id or not skill:
            raise CliError(f"--page takes PAGE_ID=SKILL, got {item!r}")
        wanted[page_id.strip()] = skill.strip()
    if not wanted:
        if not pages:
            print("this user administers no pages (or did not grant pages_show_list)")
        for p in pages:
            state = ob.directory.view(p.page_id)
            print(f"{p.page_id}  {p.name}  [{state.status if state else 'not connected'}]"
                  + (f"  tasks: {','.join(p.tasks)}" if p.tasks else ""))
        return 0
    by_id = {p.page_id: p for p in pages}
    reports = []
    for page_id, skill in wanted.items():
        page = by_id.get(page_id)
        if page is None:
            reports.append(Report(page_id).fail("this user does not administer the page (not in /me/accounts)"))
            continue
        reports.append(await ob.connect(page_id, skill, page.token, name=page.name, locale=args.locale))
    return _finish(reports)


def run(args: argparse.Namespace) -> int:
    """Entry point of `messenger-streams pages`."""
    if args.pages_command == "keygen":
        print(generate_key())
        return 0
    try:
        return asyncio.run(_run(args))
    except (PagesError, OSError) as exc:
        raise CliError(str(exc)) from None
    except ConfigError:
        raise
    finally:
        sys.stdout.flush()
