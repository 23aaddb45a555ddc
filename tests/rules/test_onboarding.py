"""debug_token answers → exactly what is missing for a page token; transfers to skills connected live."""

from __future__ import annotations

from streams.rules.conversation.api import Decision, Env, Input
from streams.rules.onboarding import REQUIRED_PAGE_SCOPES, page_fields_problem, token_problems
from tests.rules.convo import Convo, cfg, console, rejections

APP = "950864918368986"
PAGE = "1691462197845448"


def debug(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {"app_id": APP, "type": "PAGE", "profile_id": PAGE, "is_valid": True,
                               "expires_at": 0, "scopes": list(REQUIRED_PAGE_SCOPES) + ["pages_show_list"]}
    base.update(kw)
    return base


def test_a_good_page_token_has_no_problem() -> None:
    assert token_problems(debug(), APP, PAGE, 1000) == []


def test_each_problem_is_named() -> None:
    assert token_problems(debug(is_valid=False, error={"message": "expired"}), APP, PAGE) == [
        "the token is not valid: expired (log in with Facebook again)"]
    assert "belongs to app 42" in token_problems(debug(app_id="42"), APP, PAGE)[0]
    assert "USER token" in token_problems(debug(type="USER"), APP, PAGE)[0]
    assert "for page 7, not page" in token_problems(debug(profile_id="7"), APP, PAGE)[0]
    assert token_problems(debug(expires_at=10), APP, PAGE, 20) == ["the token has expired (log in with Facebook again)"]
    missing = token_problems(debug(scopes=["pages_messaging"]), APP, PAGE)
    assert missing == ["the token lacks the permission pages_manage_metadata (grant it in the Facebook Login dialog; "
                       "the app needs it approved for other people's pages)"]
    both = token_problems(debug(scopes=[]), APP, PAGE)[0]
    assert "permissions pages_messaging, pages_manage_metadata" in both
    granular = token_problems(debug(granular_scopes=[{"scope": "pages_messaging", "target_ids": ["1"]}]), APP, PAGE)
    assert granular == [f"permission pages_messaging was granted for other pages, not page {PAGE} "
                        "(choose this page in the Facebook Login dialog)"]


# --- transfers to skills connected live (Env.skills) ---------------------------------------------------


class LiveConvo(Convo):
    """A conversation decided with an Env as the stage builds it from the live page directory."""

    def __init__(self, skills: frozenset[str] | None) -> None:
        super().__init__()
        config = self.d.config
        self.env = Env(config.page(self.page), config.routing, config.external_user, skills)

    def feed(self, inp: Input) -> Decision:
        out = self.d.decide(self.state, inp, self.key, self.env)
        if not out.duplicate:
            self.state = out.state
        return out


def test_a_transfer_reaches_a_skill_connected_live() -> None:
    static = LiveConvo(None)  # no live directory: the configured skills only
    static.msg()
    static.act("accept")
    assert rejections(static.act("transfer", to_skill="returns")) == ["invalid_action"]

    live = LiveConvo(frozenset({*cfg().all_skills(), "returns"}))  # a page was connected live to `returns`
    live.msg()
    live.act("accept")
    moved = [v for v in console(live.act("transfer", to_skill="returns")) if v["type"] == "conversation_transferred"]
    assert sorted(v["skill"] for v in moved) == ["billing", "returns"]
    assert live.conv["skill"] == "returns"
    assert {v["skill"] for v in console(live.msg("still there?"))} == {"returns"}


def test_env_skills_are_the_whole_list_of_transfer_targets() -> None:
    narrow = LiveConvo(frozenset({"billing", "general"}))  # a configured skill missing from the live set
    narrow.msg()
    narrow.act("accept")
    out = narrow.act("transfer", to_skill="support")
    assert rejections(out) == ["invalid_action"] and "not a known skill" in console(out)[0]["detail"]
    assert narrow.conv["skill"] == "billing"


def test_page_fields_problem_names_the_first_bad_field() -> None:
    assert page_fields_problem("1691462197845448", "billing", "en_US") is None
    assert page_fields_problem("1691462197845448", None, None) is None
    assert "page" in (page_fields_problem("not-a-page", "billing", "en_US") or "")
    assert "skill" in (page_fields_problem("1691462197845448", "Bad Skill!", "en_US") or "")
    assert "locale" in (page_fields_problem("1691462197845448", "billing", "english") or "")
