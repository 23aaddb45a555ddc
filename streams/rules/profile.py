"""The customer's profile (User Profile API) as the conversation rules keep it: pure, no I/O.

Where the call lives: the dispatcher makes it (it holds the page tokens, the Graph session and the
per-page rate limit). When a conversation opens and the person's kept profile is missing or older
than `profile.ttl_seconds`, the rules write an outbound record with `endpoint: "user_profile"`;
the dispatcher answers on `messenger.send.results` (co-partitioned with the conversation) with the
fields it got, and the rules keep them in the conversation key's state: the key is page × person
and a PSID is page-scoped, so that state *is* the per-person cache, bounded by one small entry per
key, and it moves with the partition. Nothing waits for the answer: the conversation goes on at
once, and a failed call (no permission, 551, timeout) only sets `failed_at`, so the next attempt
comes after `profile.retry_after_seconds`.

`ProfileState` in the conversation state:
`{"data": {first_name, last_name, profile_pic, locale, timezone, gender} | None,
  "fetched_at": ms | None, "asked_at": ms | None, "failed_at": ms | None}`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypedDict

from streams.core.config_rich import Profile

NAME_MAX = 100
URL_MAX = 1000  # a longer picture URL is left out: the state stays small
LOCALE = re.compile(r"[a-z]{2,3}(_[A-Z]{2})?")
ENDPOINT = "user_profile"


class ProfileState(TypedDict):
    data: dict[str, Any] | None
    fetched_at: int | None
    asked_at: int | None
    failed_at: int | None


def empty() -> ProfileState:
    return {"data": None, "fetched_at": None, "asked_at": None, "failed_at": None}


def migrate(raw: Any) -> ProfileState:
    """A stored profile entry (or nothing) as a ProfileState."""
    st = empty()
    if isinstance(raw, Mapping):
        data = raw.get("data")
        st["data"] = dict(data) if isinstance(data, Mapping) else None
        for k in ("fetched_at", "asked_at", "failed_at"):
            v = raw.get(k)
            st[k] = v if isinstance(v, int) and not isinstance(v, bool) else None
    return st


def need_fetch(ps: ProfileState, now: int, cfg: Profile) -> bool:
    """Should the profile be asked for now? Not when switched off, fresh, asked recently (the answer
    may still come) or failed recently."""
    if not cfg.enabled:
        return False
    retry_ms = cfg.retry_after_seconds * 1000
    if ps["fetched_at"] is not None and now - ps["fetched_at"] < cfg.ttl_seconds * 1000:
        return False
    if ps["asked_at"] is not None and now - ps["asked_at"] < retry_ms:
        return False
    return not (ps["failed_at"] is not None and now - ps["failed_at"] < retry_ms)


def asked(ps: ProfileState, now: int) -> ProfileState:
    return {**ps, "asked_at": now}


def answered(ps: ProfileState, data: dict[str, Any], now: int) -> ProfileState:
    return {"data": data, "fetched_at": now, "asked_at": None, "failed_at": None}


def failed(ps: ProfileState, now: int) -> ProfileState:
    return {**ps, "asked_at": None, "failed_at": now}


def request(psid: str, cfg: Profile) -> dict[str, Any]:
    """The `request` of a profile outbound record: whom and which fields."""
    return {"psid": psid, "fields": list(cfg.fields)}


def parse(body: Mapping[str, Any], fields: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """The fields of a User Profile API answer we keep, each checked (a wrong type or an absurd value
    is left out): names are cut to 100 characters, the picture must be an http(s) URL, the locale
    like `es_MX`, the timezone an offset in hours within ±24."""
    out: dict[str, Any] = {}
    for name in ("first_name", "last_name", "gender"):
        v = body.get(name)
        if name in fields and isinstance(v, str) and v.strip():
            out[name] = v.strip()[:NAME_MAX]
    pic = body.get("profile_pic")
    if "profile_pic" in fields and isinstance(pic, str) and pic.startswith(("https://", "http://")) \
            and len(pic) <= URL_MAX:
        out["profile_pic"] = pic
    loc = body.get("locale")
    if "locale" in fields and isinstance(loc, str) and LOCALE.fullmatch(loc):
        out["locale"] = loc
    tz = body.get("timezone")
    if "timezone" in fields and isinstance(tz, int | float) and not isinstance(tz, bool) and -24 <= tz <= 24:
        out["timezone"] = tz
    return out


def locale_of(ps: ProfileState | None) -> str | None:
    """The person's locale when the kept profile has one."""
    data = ps["data"] if ps else None
    loc = data.get("locale") if data else None
    return loc if isinstance(loc, str) else None


def first_name(ps: ProfileState | None, fallback: str) -> str:
    """`{consumer_first_name}`: the kept first name, else the configured fallback text."""
    data = ps["data"] if ps else None
    name = data.get("first_name") if data else None
    return name if isinstance(name, str) and name else fallback


def console_fields(ps: ProfileState, source: str) -> dict[str, Any]:
    """The fields of the `profile` console event (`source`: `graph` for a fresh answer, `cache` for a
    kept profile shown at a conversation's start)."""
    data = ps["data"] or {}
    return {
        "first_name": data.get("first_name"),
        "last_name": data.get("last_name"),
        "profile_pic": data.get("profile_pic"),
        "locale": data.get("locale"),
        "timezone": data.get("timezone"),
        "fetched_at": ps["fetched_at"],
        "source": source,
    }
