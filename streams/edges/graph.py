"""The Graph API calls of onboarding: Facebook Login, the user's pages, token checks, webhook subscriptions.

Every call that carries an access token also carries its `appsecret_proof`. Errors become one
`GraphError` whose message is redacted (no token, code or secret in it). Tokens are `Secret`s.

- `login_url(redirect_uri, state)`: the Facebook Login dialog (`/{version}/dialog/oauth`).
- `exchange_code(code, redirect_uri)` → short-lived user token; `long_lived(user_token)` → a
  long-lived one (page tokens got with it do not expire).
- `pages(user_token)`: `/me/accounts` (id, name, page token, tasks), following `paging.next`
  up to MAX_ACCOUNT_PAGES pages.
- `debug_token(token)` with the app token `app_id|app_secret`.
- `subscribe(page_id, token, fields)` / `unsubscribe(page_id, token)`: `/{page-id}/subscribed_apps`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import aiohttp
import orjson

from streams.core.tokens import Secret, appsecret_proof, redact

DEFAULT_GRAPH_URL = "https://graph.facebook.com"
DEFAULT_DIALOG_URL = "https://www.facebook.com"
DEFAULT_API_VERSION = "v21.0"
MAX_ACCOUNT_PAGES = 1000  # pages listed from /me/accounts at most (10 requests of 100)


class GraphError(Exception):
    """A Graph call failed: `code` (Graph error code, or None), a redacted message."""

    def __init__(self, message: str, code: int | None = None, subcode: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.subcode = subcode


@dataclass(frozen=True)
class AccountPage:
    """One page of /me/accounts."""

    page_id: str
    name: str
    token: Secret = field(repr=False)
    tasks: tuple[str, ...] = ()


class GraphClient:
    """A small Graph API client for onboarding (not for sending messages: that is the dispatcher)."""

    def __init__(
        self,
        app_id: str,
        app_secret: Secret,
        *,
        graph_url: str = DEFAULT_GRAPH_URL,
        dialog_url: str = DEFAULT_DIALOG_URL,
        api_version: str = DEFAULT_API_VERSION,
        timeout: float = 15.0,
    ) -> None:
        self.app_id = app_id
        self.app_secret = app_secret
        self.graph_url = graph_url.rstrip("/")
        self.dialog_url = dialog_url.rstrip("/")
        self.api_version = api_version.strip("/")
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._secrets: list[Secret] = [app_secret]

    async def __aenter__(self) -> GraphClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _url(self, path: str) -> str:
        return f"{self.graph_url}/{self.api_version}/{path.lstrip('/')}"

    def _auth(self, token: Secret) -> dict[str, str]:
        if token not in self._secrets:
            self._secrets.append(token)
        return {"access_token": token.reveal(), "appsecret_proof": appsecret_proof(self.app_secret, token)}

    def redact(self, text: str) -> str:
        return redact(text, self._secrets)

    async def _call(self, method: str, path: str, params: dict[str, str]) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        try:
            async with self._session.request(method, self._url(path), params=params) as resp:
                data = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise GraphError(f"cannot reach the Graph API at {self.graph_url}: {type(exc).__name__}") from None
        try:
            body = orjson.loads(data) if data else {}
        except orjson.JSONDecodeError:
            raise GraphError(f"the Graph API answered HTTP {status} with a body that is not JSON") from None
        if not isinstance(body, dict):
            raise GraphError(f"the Graph API answered HTTP {status} with unexpected JSON")
        err = body.get("error")
        if status >= 400 or isinstance(err, dict):
            err = err if isinstance(err, dict) else {}
            code = err.get("code")
            sub = err.get("error_subcode")
            msg = self.redact(str(err.get("message") or f"HTTP {status}"))
            raise GraphError(
                f"{msg} (code {code}{'/' + str(sub) if sub else ''})" if code else msg,
                int(code) if isinstance(code, int) else None,
                int(sub) if isinstance(sub, int) else None,
            )
        return body

    # --- Facebook Login -------------------------------------------------------------------------
    def login_url(self, redirect_uri: str, state: str, scopes: tuple[str, ...]) -> str:
        query = urlencode({
            "client_id": self.app_id,
            "redirect_uri": redirect_uri,
            "state": state,
            "response_type": "code",
            "scope": ",".join(scopes),
        })
        return f"{self.dialog_url}/{self.api_version}/dialog/oauth?{query}"

    async def exchange_code(self, code: str, redirect_uri: str) -> Secret:
        """The user access token for a Login dialog's `code` (no access token yet: no proof)."""
        body = await self._call("GET", "oauth/access_token", {
            "client_id": self.app_id, "redirect_uri": redirect_uri,
            "client_secret": self.app_secret.reveal(), "code": code,
        })
        return self._token_of(body)

    async def long_lived(self, user_token: Secret) -> Secret:
        """A long-lived user token for a short-lived one (page tokens got with it do not expire)."""
        body = await self._call("GET", "oauth/access_token", {
            "grant_type": "fb_exchange_token", "client_id": self.app_id,
            "client_secret": self.app_secret.reveal(), "fb_exchange_token": user_token.reveal(),
            "appsecret_proof": appsecret_proof(self.app_secret, user_token),
        })
        return self._token_of(body)

    def _token_of(self, body: dict[str, Any]) -> Secret:
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise GraphError("the Graph API answered without an access_token")
        secret = Secret(token)
        self._secrets.append(secret)
        return secret

    async def pages(self, user_token: Secret) -> list[AccountPage]:
        """The pages the user administers (/me/accounts), with their page tokens."""
        out: list[AccountPage] = []
        params = {"fields": "id,name,access_token,tasks", "limit": "100", **self._auth(user_token)}
        after: str | None = None
        while len(out) < MAX_ACCOUNT_PAGES:
            body = await self._call("GET", "me/accounts", {**params, **({"after": after} if after else {})})
            for doc in body.get("data") or []:
                if not isinstance(doc, dict) or not doc.get("id") or not doc.get("access_token"):
                    continue
                token = Secret(str(doc["access_token"]))
                self._secrets.append(token)
                out.append(AccountPage(str(doc["id"]), str(doc.get("name") or doc["id"]), token,
                                       tuple(str(t) for t in doc.get("tasks") or [])))
            paging = body.get("paging") or {}
            after = (paging.get("cursors") or {}).get("after") if paging.get("next") else None
            if not after:
                break
        return out[:MAX_ACCOUNT_PAGES]

    async def debug_token(self, token: Secret) -> dict[str, Any]:
        """debug_token's `data` for `token`, asked with the app token."""
        app_token = Secret(f"{self.app_id}|{self.app_secret.reveal()}")
        body = await self._call("GET", "debug_token", {"input_token": token.reveal(), **self._auth(app_token)})
        data = body.get("data")
        if not isinstance(data, dict):
            raise GraphError("debug_token answered without data")
        return data

    async def page_name(self, page_id: str, token: Secret) -> str | None:
        try:
            body = await self._call("GET", page_id, {"fields": "name", **self._auth(token)})
        except GraphError:
            return None
        name = body.get("name")
        return str(name) if name else None

    async def subscribe(self, page_id: str, token: Secret, fields: tuple[str, ...]) -> None:
        body = await self._call("POST", f"{page_id}/subscribed_apps",
                                {"subscribed_fields": ",".join(fields), **self._auth(token)})
        if body.get("success") is not True:
            raise GraphError(f"subscribing the app to page {page_id} did not succeed")

    async def unsubscribe(self, page_id: str, token: Secret) -> None:
        body = await self._call("DELETE", f"{page_id}/subscribed_apps", self._auth(token))
        if body.get("success") is not True:
            raise GraphError(f"unsubscribing the app from page {page_id} did not succeed")

