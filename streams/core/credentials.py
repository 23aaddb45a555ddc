"""Page credentials for the Send API dispatcher: which token to send a page's messages with, or why not.

The dispatcher asks `lookup(page_id)` before each send and gets either a `Credential` (the token,
its `appsecret_proof`, the query parameters to send) or a `Refusal` (code, reason, message) that
becomes a failed SendResult without calling the Graph API. On a Graph error 190 it calls
`token_rejected(...)`; on every finished send `note_result(...)`.

- `StaticCredentials`: tokens from the environment / a tokens file, as before the page directory
  (tests and setups without it); the dispatcher's default. A 190 refuses the page until the
  process restarts with a new token.
- `DirectoryCredentials`: follows `connector.pages`. Tokens are decrypted with
  MESSENGER_STREAMS_PAGES_KEY (once per stored token); pages switched off or disconnected are
  refused; a 190 writes a `reauth:<page_id>` mark for the failing token (so every process shows the
  page as `needs_reauth`, and the metric follows) and a `page_status` console event on the page's
  skill topic; reconnecting the page stores a new token, which voids the mark: sending resumes
  without a restart. Pages without a token in the directory fall back to the static tokens.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from schemas.pages import ReauthMark
from streams.core import metrics
from streams.core.config import Account, ConfigError, ConnectorConfig, load_config
from streams.core.pages import PageDirectory, PagesWriter, now_ms, process_name
from streams.core.settings import Settings
from streams.core.tokens import (
    KEY_ENV,
    Secret,
    TokenCipher,
    TokenKeyError,
    appsecret_proof,
    load_app_secret,
    load_cipher,
    redact,
    static_token_id,
)

log = logging.getLogger("messenger_streams.credentials")


@dataclass(frozen=True)
class Credential:
    """A usable page token. `params()` are the Graph query parameters (token and proof)."""

    page_id: str
    token: Secret = field(repr=False)
    token_id: str
    proof: str | None = field(default=None, repr=False)

    def params(self) -> dict[str, str]:
        out = {"access_token": self.token.reveal()}
        if self.proof is not None:
            out["appsecret_proof"] = self.proof
        return out


@dataclass(frozen=True)
class Refusal:
    """Why a page's message is not sent: `reason` (the SendResult's: no_token, reauth_required,
    page_disabled, page_not_connected), the Graph `code` it stands for (190 for reauth_required) and a
    message."""

    page_id: str
    reason: str
    message: str
    code: int | None = None


class PageCredentials(Protocol):
    """What the dispatcher needs to know about page tokens."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def lookup(self, page_id: str) -> Credential | Refusal: ...

    def token_rejected(self, cred: Credential, code: int, subcode: int | None, message: str) -> None: ...

    def note_result(self, page_id: str, status: str) -> None: ...

    def redact(self, text: str) -> str: ...

    def describe(self) -> str: ...


def _log_rejected(cred: Credential, code: int) -> None:
    log.error("page %s: Meta rejected its access token (error %d): re-authorize the page (reconnect it)",
              cred.page_id, code)


def _credential(page_id: str, token: Secret, token_id: str, app_secret: Secret | None) -> Credential:
    proof = appsecret_proof(app_secret, token) if app_secret is not None else None
    return Credential(page_id, token, token_id, proof)


def _reauth_refusal(page_id: str) -> Refusal:
    # the reason a Graph 190 itself gets (streams/rules/sendapi.classify_error): one reason for both
    return Refusal(page_id, "reauth_required",
                   f"page {page_id} needs re-authorization: Meta rejected its token (error 190); reconnect the page",
                   190)


class StaticCredentials:
    """Tokens given at start-up (page_id → token); a 190 refuses the page until a restart."""

    def __init__(self, tokens: Mapping[str, str], app_secret: Secret | None = None) -> None:
        self._creds = {
            pid: _credential(pid, Secret(tok), static_token_id(Secret(tok)), app_secret) for pid, tok in tokens.items()
        }
        self._rejected: set[str] = set()

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def lookup(self, page_id: str) -> Credential | Refusal:
        cred = self._creds.get(page_id)
        if cred is None:
            return Refusal(page_id, "no_token", f"no access token for page {page_id}")
        if page_id in self._rejected:
            return _reauth_refusal(page_id)
        return cred

    def token_rejected(self, cred: Credential, code: int, subcode: int | None, message: str) -> None:
        if cred.page_id not in self._rejected:
            _log_rejected(cred, code)
        self._rejected.add(cred.page_id)
        metrics.PAGES_NEED_REAUTH.labels(cred.page_id).set(1)

    def note_result(self, page_id: str, status: str) -> None:
        return None

    def redact(self, text: str) -> str:
        return redact(text, [c.token for c in self._creds.values()])

    def describe(self) -> str:
        return f"{len(self._creds)} pages with static tokens"


class DirectoryCredentials:
    """Page tokens from the page directory (`connector.pages`), static tokens as the fallback."""

    def __init__(
        self,
        settings: Settings,
        config: ConnectorConfig,
        cipher: TokenCipher | None,
        app_secret: Secret | None,
        static_tokens: Mapping[str, str] | None = None,
        directory: PageDirectory | None = None,
    ) -> None:
        self.settings = settings
        self.cipher = cipher
        self.app_secret = app_secret
        self.static = StaticCredentials(static_tokens or {}, app_secret)
        self.directory = directory or PageDirectory(config, settings, track_activity=True)
        self.writer = PagesWriter(settings)
        self._cache: dict[str, Credential] = {}  # page_id → credential of its current token_id
        self._rejected: set[tuple[str, str]] = set()  # (page_id, token_id) answered 190 here
        self._tasks: set[asyncio.Task[None]] = set()
        self.directory.add_listener(self._changed)

    async def start(self) -> None:
        """Follow the directory; a stored token that the key cannot open stops start-up (one line)."""
        await self.directory.start()
        try:
            self.check_keys()
            await self.writer.start()
            await self._clear_stale_static_marks()
        except BaseException:
            await self.directory.stop()
            raise

    async def _clear_stale_static_marks(self) -> None:
        """A 190 mark of a tokens-file token that this dispatcher no longer has (the file got a new
        token) no longer applies: delete it, so the page shows active again."""
        for view in self.directory.views():
            mark = self.directory.reauth_mark(view.page_id)
            if mark is None or not (mark.token_id or "").startswith("static-"):
                continue
            got = self.static.lookup(view.page_id)
            if isinstance(got, Credential) and got.token_id != mark.token_id:
                await self.writer.clear_reauth(view.page_id)

    def check_keys(self) -> None:
        stored = [r for r in self.directory.records() if r.token is not None and r.connected]
        if not stored:
            return
        if self.cipher is None:
            raise TokenKeyError(
                f"{len(stored)} page tokens in {self.settings.topics.name('pages')} are encrypted: set {KEY_ENV}"
            )
        bad = [r.page_id for r in stored if r.token is not None and not self.cipher.can_decrypt(r.token)]
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise TokenKeyError(f"{KEY_ENV} cannot decrypt the stored tokens of pages {shown} (wrong key?)")

    async def stop(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
        await self.writer.stop()
        await self.directory.stop()

    def _changed(self, page_id: str | None) -> None:
        if page_id is None:
            return
        cred = self._cache.get(page_id)
        rec = self.directory.record(page_id)
        if cred is not None and (rec is None or rec.token_id != cred.token_id):
            del self._cache[page_id]

    def lookup(self, page_id: str) -> Credential | Refusal:
        d = self.directory
        view = d.view(page_id)
        if not d.account.active:
            return Refusal(page_id, "page_disabled", "the Facebook source is switched off")
        if view is not None and view.status == "disconnected":
            return Refusal(page_id, "page_not_connected", f"page {page_id} is disconnected")
        if view is not None and view.status == "disabled":
            return Refusal(page_id, "page_disabled", f"page {page_id} is switched off")
        rec = d.record(page_id)
        if rec is None or rec.token is None or rec.token_id is None:
            got = self.static.lookup(page_id)  # no token in the directory: the tokens file's
            if isinstance(got, Credential):
                mark = d.reauth_mark(page_id)
                if (mark is not None and mark.token_id == got.token_id) or (page_id, got.token_id) in self._rejected:
                    return _reauth_refusal(page_id)
            return got
        if (view is not None and view.status == "needs_reauth") or (page_id, rec.token_id) in self._rejected:
            return _reauth_refusal(page_id)
        cred = self._cache.get(page_id)
        if cred is None or cred.token_id != rec.token_id:
            if self.cipher is None:
                return Refusal(page_id, "no_token", f"page {page_id}: its stored token needs {KEY_ENV}")
            try:
                token = self.cipher.decrypt(rec.token, f"the token of page {page_id}")
            except TokenKeyError as exc:
                return Refusal(page_id, "no_token", str(exc))
            cred = self._cache[page_id] = _credential(page_id, token, rec.token_id, self.app_secret)
        return cred

    def token_rejected(self, cred: Credential, code: int, subcode: int | None, message: str) -> None:
        key = (cred.page_id, cred.token_id)
        if key in self._rejected:
            return
        _log_rejected(cred, code)
        self._rejected.add(key)
        metrics.PAGES_NEED_REAUTH.labels(cred.page_id).set(1)
        mark = self.directory.reauth_mark(cred.page_id)
        if mark is not None and mark.token_id == cred.token_id:
            return  # another dispatcher marked it already
        task = asyncio.create_task(self._mark(cred, code, subcode, self.redact(message)), name="pages:reauth")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _mark(self, cred: Credential, code: int, subcode: int | None, message: str) -> None:
        mark = ReauthMark(page_id=cred.page_id, token_id=cred.token_id, at=now_ms(), code=code, subcode=subcode,
                          message=message[:500], by=process_name())
        try:
            await self.writer.put_reauth(mark)
            await self.writer.page_status_event(
                self.directory, cred.page_id, "needs_reauth",
                f"Meta rejected the page's access token (error {code}); reconnect the page", ident=cred.token_id,
            )
        except Exception as exc:  # noqa: BLE001 - the in-memory refusal holds; log and go on
            log.error("page %s: cannot record that it needs re-authorization: %s", cred.page_id, exc)

    def note_result(self, page_id: str, status: str) -> None:
        self.directory.note_send(page_id, now_ms(), status)

    def redact(self, text: str) -> str:
        return self.static.redact(redact(text, [c.token for c in self._cache.values()]))

    def describe(self) -> str:
        n = sum(1 for r in self.directory.records() if r.token is not None and r.connected)
        return f"{n} pages with tokens in {self.settings.topics.name('pages')}; {self.static.describe()}"


def dispatch_credentials(
    settings: Settings, static_tokens: Mapping[str, str], app_secret_file: str | None = None
) -> DirectoryCredentials:
    """The credentials of `messenger-streams dispatch`: the page directory, with the tokens file as fallback.

    Raises ConfigError (one line) when there is no token source at all, or when tokens are to come
    from the directory (MESSENGER_STREAMS_PAGES_KEY set) without the App Secret for appsecret_proof."""
    cipher = load_cipher(required=False)
    if not static_tokens and cipher is None:
        raise ConfigError(
            "no page access tokens: set MESSENGER_STREAMS_PAGE_TOKENS or --tokens-file, "
            f"or {KEY_ENV} to send with the tokens stored in {settings.topics.name('pages')}"
        )
    app_secret = load_app_secret(app_secret_file)
    if app_secret is None:
        if cipher is not None:
            raise ConfigError(
                "no app secret: set MESSENGER_STREAMS_APP_SECRET (every Graph call carries appsecret_proof)"
            )
        log.warning("no MESSENGER_STREAMS_APP_SECRET: sends go without appsecret_proof")
    # the TOML file (if any) gives the directory its initial pages; the dispatcher can run without one
    has_file = bool(os.environ.get("MESSENGER_STREAMS_CONFIG"))
    config = load_config() if has_file else ConnectorConfig(account=Account(app_id="0"))
    return DirectoryCredentials(settings, config, cipher, app_secret, static_tokens)
