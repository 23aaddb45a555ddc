"""The page directory without Kafka: precedence over the TOML file, status, admission, Env, tokens."""

from __future__ import annotations

import hmac

import pytest

from schemas.pages import AccountRecord, PageRecord, ReauthMark
from streams.core.config import parse_config
from streams.core.credentials import Credential, DirectoryCredentials, Refusal, StaticCredentials
from streams.core.pages import PageDirectory, decode_record
from streams.core.settings import Settings
from streams.core.tokens import (
    Secret,
    TokenCipher,
    TokenKeyError,
    appsecret_proof,
    generate_key,
    load_cipher,
    redact,
    static_token_id,
)
from streams.stages.pages import LivePages
from tests.conftest import BASE_CONFIG

BILLING = "1691462197845448"
SUPPORT = "298733926841562"


def directory(extra: str = "", **kw: object) -> PageDirectory:
    d = PageDirectory(parse_config(BASE_CONFIG + extra), Settings(), **kw)  # type: ignore[arg-type]
    d._ready = True  # as after start(): records apply at once
    return d


def put(d: PageDirectory, key: str, rec: object | None) -> None:
    d._on_change(key, rec)  # type: ignore[arg-type]


def test_toml_pages_are_the_initial_set_and_a_record_wins() -> None:
    d = directory()
    assert d.page(BILLING) is not None and d.page(BILLING).skill == "billing"  # type: ignore[union-attr]
    assert d.view(BILLING).source == "config"  # type: ignore[union-attr]
    put(d, BILLING, PageRecord(page_id=BILLING, skill="support", name="Billing"))
    assert d.page(BILLING).skill == "support"  # type: ignore[union-attr]
    put(d, BILLING, PageRecord(page_id=BILLING, skill="support", connected=False))
    assert d.page(BILLING) is None and d.view(BILLING).status == "disconnected"  # type: ignore[union-attr]
    put(d, BILLING, None)  # a tombstone: the file's page again
    assert d.view(BILLING).source == "config"  # type: ignore[union-attr]


def test_admission_follows_status_source_toggle_and_unknown_pages() -> None:
    d = directory()
    assert d.admit(BILLING) is None
    assert d.admit("999") is None  # routing.unknown_pages = default_skill (the default): as before
    put(d, "account", AccountRecord(unknown_pages="dead_letter"))
    assert d.admit("999") == "page_not_connected"
    put(d, BILLING, PageRecord(page_id=BILLING, skill="billing", enabled=False))
    assert d.admit(BILLING) == "page_disabled" and d.view(BILLING).status == "disabled"  # type: ignore[union-attr]
    put(d, "account", AccountRecord(active=False))
    assert d.admit(SUPPORT) == "page_disabled"


def test_a_reauth_mark_counts_only_for_the_token_it_names() -> None:
    d = directory()
    put(d, BILLING, PageRecord(page_id=BILLING, skill="billing", token="x", token_id="t1"))
    put(d, f"reauth:{BILLING}", ReauthMark(page_id=BILLING, token_id="t1", at=1))
    assert d.view(BILLING).status == "needs_reauth"  # type: ignore[union-attr]
    assert d.admit(BILLING) is None  # incoming events still flow
    put(d, BILLING, PageRecord(page_id=BILLING, skill="billing", token="y", token_id="t2"))  # reconnected
    assert d.view(BILLING).status == "active"  # type: ignore[union-attr]


def test_records_naming_a_skill_without_topic_wait_for_it() -> None:
    d = directory(ensure_skills=True)
    put(d, "555", PageRecord(page_id="555", skill="returns"))
    assert d.page("555") is None  # held back: no topic for skill.returns yet
    assert d._pending_skills == {"returns"}
    d.skills.add("returns")  # what the skill keeper does once the topic exists
    d._recompute_all()
    assert d.page("555").skill == "returns"  # type: ignore[union-attr]


def test_live_pages_env_and_skill_topics_follow_the_directory() -> None:
    d = directory()
    live = LivePages(d, Settings())
    env = live.env_for(BILLING)
    assert env.page is not None and env.page.skill == "billing" and env.routing.mode == "entry_point"
    assert live.env_for(BILLING) is env  # cached
    put(d, "account", AccountRecord(mode="manual", external_nickname="Acme"))
    env2 = live.env_for(BILLING)
    assert env2.routing.mode == "manual" and env2.external_user.nickname == "Acme"
    d.skills.add("returns")
    put(d, "777", PageRecord(page_id="777", skill="returns"))
    assert live.skill_topics["returns"] == "skill.returns"
    assert live.env_for("777").page.skill == "returns"  # type: ignore[union-attr]


def test_decode_rejects_what_is_not_a_record() -> None:
    with pytest.raises(ValueError, match="not a page directory record"):
        decode_record(b'{"kind": "page", "page_id": "abc"}')
    assert isinstance(decode_record(b'{"kind": "account"}'), AccountRecord)


def test_cipher_round_trip_rotation_and_one_line_errors() -> None:
    k1, k2 = generate_key(), generate_key()
    token = Secret("EAAsecret")
    old = TokenCipher([k1])
    ct = old.encrypt(token)
    assert "EAAsecret" not in ct
    assert TokenCipher([k2, k1]).decrypt(ct) == token  # rotation: new key first, old one still opens
    with pytest.raises(TokenKeyError, match="cannot decrypt"):
        TokenCipher([k2]).decrypt(ct)
    with pytest.raises(TokenKeyError, match="is not set"):
        load_cipher(environ={})
    with pytest.raises(TokenKeyError, match="not a Fernet key"):
        load_cipher(environ={"MESSENGER_STREAMS_PAGES_KEY": "short"})
    assert load_cipher(required=False, environ={}) is None


def test_secrets_never_show() -> None:
    s = Secret("EAAverysecret")
    assert "EAAverysecret" not in f"{s} {s!r} {[s]}"
    cred = Credential("1", s, "t", "proof")
    assert "EAAverysecret" not in repr(cred)
    assert redact("bad token EAAverysecret in url?access_token=abc&x=1", [s]) == "bad token *** in url?access_token=***&x=1"
    # Meta's documented definition: HMAC-SHA256 of the token keyed by the app secret, hex
    assert appsecret_proof(Secret("secret"), Secret("token")) == hmac.new(b"secret", b"token", "sha256").hexdigest()
    assert static_token_id(s).startswith("static-") and "EAAverysecret" not in static_token_id(s)


def test_static_credentials_refuse_after_190_and_carry_the_proof() -> None:
    creds = StaticCredentials({"1": "tok"}, Secret("app-secret"))
    got = creds.lookup("1")
    assert isinstance(got, Credential) and set(got.params()) == {"access_token", "appsecret_proof"}
    creds.token_rejected(got, 190, None, "expired")
    refused = creds.lookup("1")
    assert isinstance(refused, Refusal) and refused.code == 190 and refused.reason == "reauth_required"
    assert isinstance(creds.lookup("2"), Refusal)


def test_directory_credentials_decrypt_refuse_and_resume_on_reconnect() -> None:
    key = generate_key()
    cipher = TokenCipher([key])
    d = directory()
    creds = DirectoryCredentials(Settings(), d.config, cipher, Secret("app-secret"), {SUPPORT: "file-token"},
                                 directory=d)
    put(d, BILLING, PageRecord(page_id=BILLING, skill="billing", token=cipher.encrypt(Secret("tok1")), token_id="t1"))
    got = creds.lookup(BILLING)
    assert isinstance(got, Credential) and got.token.reveal() == "tok1"
    assert isinstance(creds.lookup(SUPPORT), Credential)  # no token in the directory: the tokens file's
    put(d, f"reauth:{BILLING}", ReauthMark(page_id=BILLING, token_id="t1", at=1))
    refused = creds.lookup(BILLING)
    assert isinstance(refused, Refusal) and refused.code == 190
    put(d, BILLING, PageRecord(page_id=BILLING, skill="billing", token=cipher.encrypt(Secret("tok2")), token_id="t2"))
    again = creds.lookup(BILLING)
    assert isinstance(again, Credential) and again.token.reveal() == "tok2"
    put(d, BILLING, PageRecord(page_id=BILLING, skill="billing", enabled=False, token=None))
    assert creds.lookup(BILLING) == Refusal(BILLING, "page_disabled", f"page {BILLING} is switched off")
    creds.check_keys()  # nothing stored that the key cannot open
    put(d, SUPPORT, PageRecord(page_id=SUPPORT, skill="support", token=TokenCipher([generate_key()]).encrypt(
        Secret("x")), token_id="t9"))
    with pytest.raises(TokenKeyError, match=f"cannot decrypt the stored tokens of pages {SUPPORT}"):
        creds.check_keys()
