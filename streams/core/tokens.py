"""Page access tokens as secrets: encrypted at rest (Fernet), proven with `appsecret_proof`, redacted.

- The key comes from MESSENGER_STREAMS_PAGES_KEY: one Fernet key (32 url-safe base64 bytes, made by
  `messenger-streams pages keygen`), or several separated by commas to rotate keys (the first
  encrypts, every one may decrypt). A missing or malformed key is one line naming the variable.
- `appsecret_proof` = HMAC-SHA256 of the access token keyed with the App Secret, hex; Meta checks it
  on every call when the app requires it ("Require App Secret" in the app's advanced settings).
- `Secret` holds a token so that no repr, str, f-string or log line can show it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from streams.core.config import ConfigError

KEY_ENV = "MESSENGER_STREAMS_PAGES_KEY"
APP_SECRET_ENV = "MESSENGER_STREAMS_APP_SECRET"  # noqa: S105 - the variable's name, not a secret
APP_SECRET_FILE_ENV = "MESSENGER_STREAMS_APP_SECRET_FILE"  # noqa: S105 - the variable's name


class TokenKeyError(ConfigError):
    """The token key is missing, malformed, or does not decrypt what is stored (one-line message)."""


class Secret:
    """A secret string (an access token). Shown as `Secret(***)` everywhere; `.reveal()` gives it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return "Secret(***)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __bool__(self) -> bool:
        return bool(self._value)


def generate_key() -> str:
    """A new Fernet key, as text for MESSENGER_STREAMS_PAGES_KEY."""
    return Fernet.generate_key().decode("ascii")


class TokenCipher:
    """Encrypts and decrypts page tokens with the key(s) of MESSENGER_STREAMS_PAGES_KEY."""

    def __init__(self, keys: Iterable[str]) -> None:
        fernets = []
        for i, key in enumerate(k.strip() for k in keys):
            if not key:
                continue
            try:
                fernets.append(Fernet(key.encode("ascii")))
            except (ValueError, UnicodeEncodeError):
                which = f"key {i + 1} of " if i else ""
                raise TokenKeyError(
                    f"{which}{KEY_ENV} is not a Fernet key (32 url-safe base64-encoded bytes; "
                    "make one with `messenger-streams pages keygen`)"
                ) from None
        if not fernets:
            raise TokenKeyError(f"{KEY_ENV} is empty: set it to a key made by `messenger-streams pages keygen`")
        self._fernet = MultiFernet(fernets)

    def encrypt(self, token: Secret) -> str:
        return self._fernet.encrypt(token.reveal().encode("utf-8")).decode("ascii")

    def decrypt(self, ciphertext: str, what: str = "a page token") -> Secret:
        """The token; TokenKeyError (naming `what`, never the token) when no key opens it."""
        try:
            return Secret(self._fernet.decrypt(ciphertext.encode("ascii")).decode("utf-8"))
        except (InvalidToken, UnicodeError, ValueError):
            raise TokenKeyError(f"{KEY_ENV} cannot decrypt {what} (wrong key?)") from None

    def can_decrypt(self, ciphertext: str) -> bool:
        try:
            self._fernet.decrypt(ciphertext.encode("ascii"))
        except (InvalidToken, UnicodeError, ValueError):
            return False
        return True


def load_cipher(required: bool = True, environ: dict[str, str] | None = None) -> TokenCipher | None:
    """The cipher from MESSENGER_STREAMS_PAGES_KEY; None when it is unset and not `required`."""
    env = os.environ if environ is None else environ
    raw = env.get(KEY_ENV, "")
    if not raw.strip():
        if required:
            raise TokenKeyError(
                f"{KEY_ENV} is not set: page tokens are stored encrypted with it "
                "(make one with `messenger-streams pages keygen`)"
            )
        return None
    return TokenCipher(raw.split(","))


def load_app_secret(path: str | None = None, environ: dict[str, str] | None = None) -> Secret | None:
    """The App Secret from `path`, else MESSENGER_STREAMS_APP_SECRET_FILE, else MESSENGER_STREAMS_APP_SECRET."""
    env = os.environ if environ is None else environ
    path = path or env.get(APP_SECRET_FILE_ENV)
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                value = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or "not UTF-8"
            raise ConfigError(f"cannot read the app secret file {path}: {why}") from None
        if not value:
            raise ConfigError(f"the app secret file {path} is empty")
        return Secret(value)
    value = env.get(APP_SECRET_ENV, "").strip()
    return Secret(value) if value else None


def appsecret_proof(app_secret: Secret, access_token: Secret) -> str:
    """Meta's `appsecret_proof`: HMAC-SHA256(key=App Secret, msg=access token), lowercase hex."""
    return hmac.new(app_secret.reveal().encode(), access_token.reveal().encode(), hashlib.sha256).hexdigest()


def static_token_id(token: Secret) -> str:
    """A stable id for a token that lives outside the directory (a tokens file): never the token, and
    not a plain hash of it either (keyed, truncated)."""
    digest = hmac.new(b"messenger-streams token id", token.reveal().encode(), hashlib.sha256).hexdigest()
    return "static-" + digest[:16]


def redact(text: str, secrets: Iterable[Secret | str]) -> str:
    """`text` with every secret longer than 3 characters (longest first) and every `access_token=…`
    value replaced by ***. The one redaction of the project (the dispatcher's, the Graph client's)."""
    values = (s.reveal() if isinstance(s, Secret) else s for s in secrets)
    for value in sorted((v for v in values if v and len(v) > 3), key=len, reverse=True):
        text = text.replace(value, "***")
    return _redact_params(text)


def _redact_params(text: str) -> str:
    out = []
    for part in text.split("&"):
        for name in ("access_token=", "client_secret=", "fb_exchange_token=", "input_token=", "code="):
            idx = part.find(name)
            if idx >= 0 and (idx == 0 or part[idx - 1] in "?& \t"):
                part = part[: idx + len(name)] + "***"
                break
        out.append(part)
    return "&".join(out)
