"""Onboarding rules, pure: what a page token must allow, what our app subscribes to, valid names.

`token_problems(debug, app_id, page_id)` reads the `data` of Graph `GET /debug_token` and says,
one line each, exactly what is wrong with a page token for this connector (so the admin page and
`pages` commands can report what is missing instead of failing later in the dispatcher).
"""

from __future__ import annotations

import re
from typing import Any

# Needed on the page token: sending (pages_messaging) and subscribing the app to the page's
# webhooks (pages_manage_metadata).
REQUIRED_PAGE_SCOPES = ("pages_messaging", "pages_manage_metadata")
# Asked in the Facebook Login dialog: the above, plus listing the user's pages (pages_show_list),
# reading page names (pages_read_engagement) and pages owned through a Business Manager
# (business_management).
LOGIN_SCOPES = (
    "pages_messaging",
    "pages_manage_metadata",
    "pages_show_list",
    "pages_read_engagement",
    "business_management",
)
# Every webhook field the processor handles (POST /{page-id}/subscribed_apps).
SUBSCRIBED_FIELDS = (
    "messages",
    "messaging_postbacks",
    "message_echoes",
    "message_deliveries",
    "message_reads",
    "messaging_handovers",
    "standby",
    "messaging_optins",
    "messaging_referrals",
    "message_reactions",
)

_PAGE_ID = re.compile(r"^[0-9]{1,40}$")
_SKILL = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
_LOCALE = re.compile(r"^[a-z]{2,3}(_[A-Z]{2})?$")


def page_id_problem(page_id: str) -> str | None:
    if not _PAGE_ID.match(page_id):
        return f"page id {page_id!r} must be digits (a Facebook page id)"
    return None


def skill_problem(skill: str) -> str | None:
    if not _SKILL.match(skill):
        return f"skill {skill!r} may hold only letters, digits, '.', '_' and '-' (1-200 characters)"
    return None


def locale_problem(locale: str) -> str | None:
    if not _LOCALE.match(locale):
        return f"locale {locale!r} must look like en_US"
    return None


def page_fields_problem(page_id: str, skill: str | None, locale: str | None) -> str | None:
    """The first problem of a page's id and its optional skill and locale, or None."""
    return page_id_problem(page_id) or (skill and skill_problem(skill)) or (locale and locale_problem(locale)) or None


def granted_scopes(debug: dict[str, Any]) -> list[str]:
    return sorted({str(s) for s in debug.get("scopes") or []})


def token_problems(debug: dict[str, Any], app_id: str, page_id: str, now_s: int | None = None) -> list[str]:
    """What is wrong with a page token for this connector, from debug_token's `data`; [] when usable."""
    problems: list[str] = []
    if not debug.get("is_valid", False):
        err = debug.get("error") or {}
        why = err.get("message") if isinstance(err, dict) else None
        problems.append(f"the token is not valid{': ' + str(why) if why else ''} (log in with Facebook again)")
        return problems
    if str(debug.get("app_id", "")) != app_id:
        problems.append(
            f"the token belongs to app {debug.get('app_id')}, not to this connector's app {app_id} "
            "(log in through this connector)"
        )
    kind = str(debug.get("type", "")).upper()
    if kind and kind != "PAGE":
        problems.append(f"the token is a {kind} token: a PAGE access token is needed (from /me/accounts)")
    profile = debug.get("profile_id")
    if kind == "PAGE" and profile is not None and str(profile) != page_id:
        problems.append(f"the token is for page {profile}, not page {page_id}")
    expires = int(debug.get("expires_at") or 0)
    if expires and now_s is not None and expires <= now_s:
        problems.append("the token has expired (log in with Facebook again)")
    scopes = set(granted_scopes(debug))
    missing = [s for s in REQUIRED_PAGE_SCOPES if s not in scopes]
    if missing:
        problems.append(
            "the token lacks the permission" + ("s " if len(missing) > 1 else " ") + ", ".join(missing)
            + " (grant it in the Facebook Login dialog; the app needs it approved for other people's pages)"
        )
    for g in debug.get("granular_scopes") or []:
        if not isinstance(g, dict) or g.get("scope") not in REQUIRED_PAGE_SCOPES:
            continue
        targets = g.get("target_ids")
        if targets and page_id not in {str(t) for t in targets}:
            problems.append(f"permission {g['scope']} was granted for other pages, not page {page_id} "
                            "(choose this page in the Facebook Login dialog)")
    return problems
