"""The guard in front of every route (plain ASGI, so it also covers the page and errors):

- the API key, when the server has one: ``Authorization: Bearer KEY`` (what OpenAI clients send), or the
  ``lmedit_key`` cookie that ``GET /?key=KEY`` sets for the page (HttpOnly, SameSite=Strict);
- the Host header must name the server (a page on another site cannot reach a loopback server through a
  DNS name that points at 127.0.0.1), and a browser's Origin, when sent, must be the server's own;
- bounded bodies: at most ``max_body`` bytes (``max_import`` for ``POST /v1/edits/import``), 413 beyond.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlsplit

COOKIE = "lmedit_key"
IMPORT_PATH = "/v1/edits/import"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def _host_name(value: str) -> str:
    if value.startswith("["):  # [::1]:8000
        return value[: value.index("]") + 1]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    """ASGI middleware. ``allowed_hosts`` is None to accept any Host (a server bound to all interfaces)."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, allowed_hosts: set[str] | None,
                 max_body: int, max_import: int) -> None:
        self.app, self.api_key, self.allowed_hosts = app, api_key, allowed_hosts
        self.max_body, self.max_import = max_body, max_import

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if self.allowed_hosts is not None and _host_name(host) not in self.allowed_hosts:
            await _reply(send, 403, f"Host {host!r} is not this server's; use http://127.0.0.1:<port>/")
            return
        origin = headers.get("origin")
        if origin and origin != "null" and urlsplit(origin).netloc != host:
            await _reply(send, 403, f"requests from {origin} are refused: the page must be opened from this "
                                    "server itself")
            return
        if self.api_key is not None:
            given = self._given_key(scope, headers)
            if given is None or not hmac.compare_digest(given.encode(), self.api_key.encode()):
                await _reply(send, 401, "missing or wrong API key: send 'Authorization: Bearer KEY', or open "
                                        "the page once as /?key=KEY", auth=True)
                return
            if scope["path"] == "/" and "key" in parse_qs(scope.get("query_string", b"").decode()):
                await _login(send, given)
                return
        limit = self.max_import if scope["path"] == IMPORT_PATH else self.max_body
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _reply(send, 413, f"request body over {limit} bytes")
            return
        body = await _read_body(receive, limit)
        if body is None:
            await _reply(send, 413, f"request body over {limit} bytes")
            return
        await self.app(scope, _replay(body, receive), send)

    @staticmethod
    def _given_key(scope: Scope, headers: dict[str, str]) -> str | None:
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        if "x-api-key" in headers:
            return headers["x-api-key"]
        if "cookie" in headers:
            morsel = SimpleCookie(headers["cookie"]).get(COOKIE)
            if morsel is not None:
                return morsel.value
        if scope["path"] == "/" and scope["method"] == "GET":
            keys = parse_qs(scope.get("query_string", b"").decode()).get("key")
            return keys[0] if keys else None
        return None


async def _read_body(receive: Callable, limit: int) -> bytes | None:
    """The whole request body, or None once it passes ``limit`` (chunked bodies are counted as they come)."""
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            return b""
        size += len(message.get("body", b""))
        if size > limit:
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


def _replay(body: bytes, receive: Callable) -> Callable:
    """A ``receive`` that hands the app the body already read, then waits on the real one (disconnects)."""
    sent = False

    async def wrapped() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return wrapped


async def _reply(send: Callable, status: int, message: str, *, auth: bool = False) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": status}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if auth:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _login(send: Callable, key: str) -> None:
    cookie = f"{COOKIE}={key}; HttpOnly; SameSite=Strict; Path=/"
    await send({"type": "http.response.start", "status": 303,
                "headers": [(b"location", b"/"), (b"set-cookie", cookie.encode()), (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})
