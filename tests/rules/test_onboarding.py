"""debug_token answers → exactly what is missing for a page token."""

from __future__ import annotations

from streams.rules.onboarding import REQUIRED_PAGE_SCOPES, token_problems

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
