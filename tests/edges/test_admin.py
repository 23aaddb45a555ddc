"""The admin page's HTTP surface without a browser: sign-in, sessions, CSRF, headers, bad input (#14)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from streams.core.config import parse_config
from streams.core.settings import Settings
from streams.core.tokens import Secret
from streams.edges.admin import COOKIE, AdminOptions, AdminServer, Sessions, password_matches
from tests.conftest import BASE_CONFIG

PASSWORD = "s3cret-password"


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, html[:500]
    return m.group(1)


@pytest.fixture
async def client() -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    opts = AdminOptions(settings=Settings(), config=parse_config(BASE_CONFIG), password=Secret(PASSWORD),
                        failed_login_delay=0.0)
    server = AdminServer(opts)  # not started: the directory answers from the TOML file
    async with TestClient(TestServer(server.app())) as c:
        yield c


async def signed_in(c: TestClient) -> str:  # type: ignore[type-arg]
    page = await (await c.get("/login")).text()
    r = await c.post("/login", data={"csrf": csrf_of(page), "password": PASSWORD}, allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/"
    return csrf_of(await (await c.get("/")).text())


async def test_everything_needs_a_signed_in_session(client: TestClient) -> None:  # type: ignore[type-arg]
    for path in ("/", "/connect", "/facebook/login"):
        r = await client.get(path, allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == "/login", path
    r = await client.post("/pages/1691462197845448/disable", data={"csrf": "x"}, allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/login"


async def test_sign_in_sets_a_fresh_httponly_session_cookie(client: TestClient) -> None:  # type: ignore[type-arg]
    r = await client.get("/login")
    before = r.cookies[COOKIE].value
    assert "httponly" in r.headers["Set-Cookie"].lower() and "samesite=lax" in r.headers["Set-Cookie"].lower()
    html = await r.text()
    bad = await client.post("/login", data={"csrf": csrf_of(html), "password": "nope"})
    assert bad.status == 400 and "wrong password" in await bad.text()
    ok = await client.post("/login", data={"csrf": csrf_of(html), "password": PASSWORD}, allow_redirects=False)
    assert ok.status == 303 and ok.cookies[COOKIE].value != before  # no session fixation
    index = await client.get("/")
    text = await index.text()
    assert index.status == 200 and "1691462197845448" in text and "Activate Facebook source" in text
    assert index.headers["X-Frame-Options"] == "DENY" and "default-src 'none'" in index.headers["Content-Security-Policy"]
    # no App Secret configured: the Facebook Login button says what is missing instead
    assert "needs <code>MESSENGER_STREAMS_APP_SECRET</code>" in text


async def test_forms_without_the_csrf_token_are_refused(client: TestClient) -> None:  # type: ignore[type-arg]
    page = await (await client.get("/login")).text()
    r = await client.post("/login", data={"password": PASSWORD})
    assert r.status == 403 and "CSRF" in await r.text()
    csrf = csrf_of(page)
    await client.post("/login", data={"csrf": csrf, "password": PASSWORD})
    r = await client.post("/pages/1691462197845448/disable", data={"csrf": "forged"})
    assert r.status == 403
    r = await client.post("/account", data={})
    assert r.status == 403


async def test_oauth_callback_checks_state(client: TestClient) -> None:  # type: ignore[type-arg]
    await signed_in(client)
    r = await client.get("/facebook/callback?code=abc&state=guess", allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/"
    assert "does not match this login" in await (await client.get("/")).text()


def test_sessions_are_bounded_and_expire() -> None:
    s = Sessions(max_sessions=3, ttl=1000)
    ids = [s.new().sid for _ in range(5)]
    assert len(s) == 3 and s.get(ids[0]) is None and s.get(ids[4]) is not None
    s.ttl = -1
    assert s.get(ids[4]) is None


def test_password_check() -> None:
    assert password_matches(PASSWORD, Secret(PASSWORD))
    assert not password_matches(PASSWORD + "x", Secret(PASSWORD))
    assert not password_matches("", Secret(PASSWORD))


def test_missing_secrets_are_one_line_start_up_errors(tmp_path: object) -> None:
    import os
    import subprocess

    from tests.onboardingtools import CLI

    env = {k: v for k, v in os.environ.items() if not k.startswith("MESSENGER_STREAMS_")}
    proc = subprocess.run([CLI, "admin"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "messenger-streams: error: no admin password: set MESSENGER_STREAMS_ADMIN_PASSWORD")
    env["MESSENGER_STREAMS_PAGES_KEY"] = "x" * 44
    proc = subprocess.run([CLI, "dispatch"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "not a Fernet key" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    from streams.core.tokens import generate_key

    env["MESSENGER_STREAMS_PAGES_KEY"] = generate_key()
    proc = subprocess.run([CLI, "dispatch"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "no app secret" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
