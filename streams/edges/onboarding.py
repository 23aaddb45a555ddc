"""Connecting, changing and disconnecting pages: the same rules under `messenger-streams pages` and the admin page.

Connecting a page with a token: check the token (`debug_token`: this app, a PAGE token of this
page, the permissions needed), subscribe the app to the page's webhooks (every field the processor
handles), create the skill's topic, then write the page record with the token encrypted. Any
failed step stops before the record is written and says exactly what is missing. Reconnecting a
page that needed re-authorisation stores a new token (a new `token_id`), which voids the old
mark everywhere: sending resumes without a restart.

Disconnecting unsubscribes the app (with the stored token) and writes `connected: false`.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field

from schemas.pages import AccountRecord, PageRecord
from streams.core.config import ConfigError
from streams.core.pages import PageDirectory, PagesWriter, now_ms
from streams.core.tokens import Secret, TokenCipher, TokenKeyError
from streams.edges.graph import GraphClient, GraphError
from streams.rules.onboarding import (
    REQUIRED_PAGE_SCOPES,
    SUBSCRIBED_FIELDS,
    granted_scopes,
    page_fields_problem,
    page_id_problem,
    token_problems,
)


class OnboardingError(ValueError):
    """A step of onboarding failed; the message says what (one line, no secret)."""


@dataclass
class Report:
    """What one onboarding step did (`notes`) and, when it failed, what is missing (`problems`)."""

    page_id: str
    ok: bool = True
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def fail(self, problem: str) -> Report:
        self.ok = False
        self.problems.append(problem)
        return self

    def line(self) -> str:
        if self.ok:
            return f"page {self.page_id}: " + ("; ".join(self.notes) or "done")
        return f"page {self.page_id}: " + "; ".join(self.problems)


class Onboarding:
    """Page and account changes, written to `connector.pages` (the directory must be started)."""

    def __init__(
        self,
        directory: PageDirectory,
        writer: PagesWriter,
        *,
        by: str,
        graph: GraphClient | None = None,
        cipher: TokenCipher | None = None,
    ) -> None:
        self.directory = directory
        self.writer = writer
        self.graph = graph
        self.cipher = cipher
        self.by = by

    # --- checks -----------------------------------------------------------------------------------
    def check_cipher(self) -> TokenCipher:
        """The cipher, after checking it opens the tokens already stored (never mix keys)."""
        if self.cipher is None:
            raise TokenKeyError("MESSENGER_STREAMS_PAGES_KEY is not set: page tokens are stored encrypted with it "
                                "(make one with `messenger-streams pages keygen`)")
        bad = [r.page_id for r in self.directory.records() if r.token and not self.cipher.can_decrypt(r.token)]
        if bad:
            raise TokenKeyError(
                f"MESSENGER_STREAMS_PAGES_KEY cannot decrypt the tokens already stored for pages {', '.join(bad[:5])}: "
                "use the key they were stored with (to rotate, list the new key first, then the old one)"
            )
        return self.cipher

    async def check_token(self, page_id: str, token: Secret, report: Report) -> dict[str, object] | None:
        """debug_token's data when the token is usable for the page; None (and the problems) otherwise."""
        assert self.graph is not None  # noqa: S101 - callers check
        try:
            debug = await self.graph.debug_token(token)
        except GraphError as exc:
            report.fail(f"cannot check the token: {exc}")
            return None
        problems = token_problems(debug, self.graph.app_id, page_id, int(time.time()))
        for p in problems:
            report.fail(p)
        return None if problems else debug

    # --- pages ------------------------------------------------------------------------------------
    async def connect(
        self,
        page_id: str,
        skill: str | None,
        token: Secret,
        *,
        name: str | None = None,
        locale: str | None = None,
    ) -> Report:
        """Check the token, subscribe the app, create the skill topic, store the page (token encrypted)."""
        report = Report(page_id)
        if problem := page_fields_problem(page_id, skill, locale):
            return report.fail(problem)
        if self.graph is None:
            return report.fail("connecting a page needs the App Secret: set MESSENGER_STREAMS_APP_SECRET")
        try:
            cipher = self.check_cipher()
        except ConfigError as exc:
            return report.fail(str(exc))
        debug = await self.check_token(page_id, token, report)
        if debug is None:
            return report
        try:
            await self.graph.subscribe(page_id, token, SUBSCRIBED_FIELDS)
        except GraphError as exc:
            return report.fail(f"cannot subscribe the app to the page's webhooks: {exc}")
        report.notes.append("app subscribed to " + ", ".join(SUBSCRIBED_FIELDS))
        old = self.current(page_id)
        skill = skill or (old.skill if old else None)
        if skill and await self.writer.ensure_skill_topic(skill):
            report.notes.append(f"created topic for skill {skill}")
        if name is None:
            name = (old.name if old else None) or await self.graph.page_name(page_id, token)
        now = now_ms()
        reconnect = old is not None and old.connected
        was_reauth = (v := self.directory.view(page_id)) is not None and v.status == "needs_reauth"
        expires = int(debug.get("expires_at") or 0)  # type: ignore[call-overload]  # JSON number
        rec = PageRecord(
            page_id=page_id,
            name=name,
            skill=skill,
            locale=locale or (old.locale if old else "en_US"),
            enabled=old.enabled if (old is not None and old.connected) else True,
            connected=True,
            connected_at=old.connected_at if reconnect and old is not None else now,
            connected_by=old.connected_by if reconnect and old is not None else self.by,
            updated_at=now,
            updated_by=self.by,
            token=cipher.encrypt(token),
            token_id=secrets.token_hex(8),
            token_expires_at=expires * 1000 if expires else None,
            scopes=granted_scopes(debug),
            subscribed_fields=list(SUBSCRIBED_FIELDS),
        )
        await self.writer.put_page(rec)
        if self.directory.reauth_mark(page_id) is not None:
            await self.writer.clear_reauth(page_id)
        await self.wait_seen(page_id, rec)
        if was_reauth:
            await self.writer.page_status_event(self.directory, page_id, "active", "the page was reconnected",
                                                ident=rec.token_id)
            report.notes.append("re-authorised: sending resumes")
        report.notes.append(f"connected to skill {skill or self.directory.routing.default_skill}")
        return report

    def current(self, page_id: str) -> PageRecord | None:
        """The page's record, or one made from the TOML file's page (so a change starts from it)."""
        rec = self.directory.record(page_id)
        if rec is not None:
            return rec
        cfg = self.directory.config.page(page_id)
        if cfg is None:
            return None
        return PageRecord(page_id=page_id, name=cfg.name, skill=cfg.skill, locale=cfg.locale)

    async def set_page(
        self,
        page_id: str,
        *,
        skill: str | None = None,
        name: str | None = None,
        locale: str | None = None,
    ) -> Report:
        """Add a page without a token (the dispatcher's tokens file sends for it) or change a page's settings."""
        report = Report(page_id)
        if problem := page_fields_problem(page_id, skill, locale):
            return report.fail(problem)
        old = self.current(page_id)
        if old is None and not skill:
            return report.fail("a new page needs --skill")
        if skill and await self.writer.ensure_skill_topic(skill):
            report.notes.append(f"created topic for skill {skill}")
        now = now_ms()
        base = old or PageRecord(page_id=page_id, connected_at=now, connected_by=self.by)
        if not base.connected:
            base = base.model_copy(update={"connected": True, "connected_at": now, "connected_by": self.by})
        rec = base.model_copy(update={
            "skill": skill or base.skill,
            "name": name if name is not None else base.name,
            "locale": locale or base.locale,
            "updated_at": now,
            "updated_by": self.by,
        })
        rec = PageRecord.model_validate(rec.model_dump())
        await self.writer.put_page(rec)
        await self.wait_seen(page_id, rec)
        if rec.token is None:
            report.notes.append("no token stored: the dispatcher sends with its tokens file (or use --token-stdin)")
        report.notes.append(f"skill {rec.skill}, locale {rec.locale}" + (f", name {rec.name!r}" if rec.name else ""))
        return report

    async def enable(self, page_id: str, on: bool) -> Report:
        """Switch a connected page on or off (events of a page switched off go to the dead-letter topic)."""
        report = Report(page_id)
        if problem := page_id_problem(page_id):
            return report.fail(problem)
        old = self.current(page_id)
        if old is None or not old.connected:
            return report.fail("the page is not connected (connect it first)")
        if old.enabled == on and self.directory.record(page_id) is not None:
            report.notes.append("already " + ("on" if on else "off"))
            return report
        rec = old.model_copy(update={"enabled": on, "updated_at": now_ms(), "updated_by": self.by})
        await self.writer.put_page(rec)
        await self.wait_seen(page_id, rec)
        await self.writer.page_status_event(self.directory, page_id, "active" if on else "disabled",
                                            "switched on" if on else "switched off", ident=str(rec.updated_at))
        report.notes.append("switched on" if on else
                            "switched off: its events go to the dead-letter topic (reason page_disabled)")
        return report

    async def disconnect(self, page_id: str) -> Report:
        """Unsubscribe the app from the page (with its stored token) and mark it disconnected."""
        report = Report(page_id)
        if problem := page_id_problem(page_id):
            return report.fail(problem)
        old = self.current(page_id)
        if old is None or not old.connected:
            return report.fail("the page is not connected")
        if old.token is not None:
            if self.graph is None or self.cipher is None:
                report.notes.append("app NOT unsubscribed (needs MESSENGER_STREAMS_APP_SECRET and "
                                    "MESSENGER_STREAMS_PAGES_KEY): remove the app in the page's settings")
            else:
                try:
                    token = self.cipher.decrypt(old.token, f"the token of page {page_id}")
                    await self.graph.unsubscribe(page_id, token)
                    report.notes.append("app unsubscribed from the page's webhooks")
                except (GraphError, ConfigError) as exc:
                    report.notes.append(f"app NOT unsubscribed ({exc}): remove the app in the page's settings")
        else:
            report.notes.append("no stored token: the app stays subscribed until removed in the page's settings")
        now = now_ms()
        rec = old.model_copy(update={
            "connected": False, "enabled": False, "token": None, "token_id": None, "updated_at": now,
            "updated_by": self.by,
        })
        await self.writer.put_page(rec)
        if self.directory.reauth_mark(page_id) is not None:
            await self.writer.clear_reauth(page_id)
        await self.wait_seen(page_id, rec)
        report.notes.append("disconnected")
        return report

    # --- account ----------------------------------------------------------------------------------
    async def set_account(self, **changes: object) -> AccountRecord:
        """Change account settings (active, mode, default_skill, unknown_pages, external_agent_id,
        external_nickname); raises OnboardingError for a bad value."""
        current = self.directory.account
        data = {**current.model_dump(), **{k: v for k, v in changes.items() if v is not None}}
        data.update(updated_at=now_ms(), updated_by=self.by)
        try:
            rec = AccountRecord.model_validate(data)
        except ValueError as exc:
            raise OnboardingError(f"invalid account settings: {str(exc).splitlines()[-1].strip()}") from None
        if not rec.external_agent_id.strip() or not rec.external_nickname.strip():
            raise OnboardingError("the external user needs an agent id and a nickname")
        if rec.default_skill != current.default_skill:
            await self.writer.ensure_skill_topic(rec.default_skill)
        await self.writer.put_account(rec)
        await self._until(lambda: self.directory.account == rec)
        return rec

    # --- waiting for our own write ------------------------------------------------------------------
    async def wait_seen(self, page_id: str, rec: PageRecord, timeout: float = 10.0) -> bool:
        """True once the directory (our own mirror) shows `rec`: what the next page load will see."""
        return await self._until(lambda: self.directory.record(page_id) == rec, timeout)

    async def _until(self, cond: object, timeout: float = 10.0) -> bool:
        if not self.directory.ready:
            return False
        deadline = asyncio.get_running_loop().time() + timeout
        while not cond():  # type: ignore[operator]
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True


__all__ = ["REQUIRED_PAGE_SCOPES", "Onboarding", "OnboardingError", "Report"]
