"""The door: who may send a request, in what form, and how long its body may take.

An ASGI middleware in front of the app, applied before any route runs:

- **Origin.** A browser page on a foreign site can send requests to a local
  server (and, here, create a named agent); a request whose ``Origin`` is
  neither a loopback address nor the server's own host is refused with 403.
  Clients outside browsers send no ``Origin``.
- **API key.** With one set, every route but ``/health`` needs
  ``Authorization: Bearer KEY`` (OpenAI's clients) or ``x-api-key: KEY``
  (Anthropic's), compared in constant time; else 401.
- **Content type.** A POST body must be ``application/json`` (415): a page's
  plain form post, which browsers send without asking, is not.
- **Body.** The whole body is read here, within ``body_timeout`` seconds
  (408 after) and up to ``MAX_BODY_BYTES`` (413), then handed to the app. A
  client that goes away while sending is one INFO line, not a traceback.

Slow headers are the HTTP protocol's to catch (:mod:`.http_protocol`).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any
from urllib.parse import urlsplit

from starlette.responses import JSONResponse

from blockpool.server.api_errors import ApiError
from blockpool.server.flags import is_loopback

log = logging.getLogger("blockpool.server")

#: Largest request body read (prompts are bounded in tokens long before this).
MAX_BODY_BYTES = 32 << 20

Scope = dict[str, Any]


class RequestGuard:
    """ASGI middleware applying the checks above.

    Args:
        app: The ASGI app behind it.
        api_key: The key every route but ``/health`` needs (None: no key).
        body_timeout: Seconds a request may take to send its body.
    """

    def __init__(self, app: Any, api_key: str | None = None, body_timeout: float = 30.0):
        self.app, self.body_timeout = app, body_timeout
        self._key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            self._check(scope, headers)
            if scope["method"] == "POST":
                body = await self._read_body(scope, receive)
                if body is None:
                    return  # the client went away
                receive = _replay(body, receive)
        except ApiError as error:
            await _refuse(scope, receive, send, error)
            return
        await self.app(scope, receive, send)

    def _check(self, scope: Scope, headers: dict[str, str]) -> None:
        origin = headers.get("origin")
        if origin is not None and not _same_site(origin, headers.get("host", "")):
            raise ApiError(
                403,
                f"requests from the web origin {origin!r} are refused: this server takes requests from "
                "programs, and from pages it serves itself",
                kind="permission_error",
            )
        if self._key is not None and scope["path"] != "/health" and not self._authorized(headers):
            raise ApiError(
                401,
                "an API key is needed: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                kind="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if scope["method"] == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                raise ApiError(
                    415, f"the body must be sent as application/json, not {kind or 'without a content type'}"
                )

    def _authorized(self, headers: dict[str, str]) -> bool:
        bearer = headers.get("authorization", "")
        offered = [headers.get("x-api-key", "")]
        if bearer[:7].lower() == "bearer ":
            offered.append(bearer[7:].strip())
        # Every offer compared, in constant time, so timing does not tell which header was close.
        return any([hmac.compare_digest(o.encode(), self._key) for o in offered if o])

    async def _read_body(self, scope: Scope, receive: Any) -> bytes | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise ApiError(
                    408, f"the request body did not arrive within {self.body_timeout:g} s", kind="timeout_error"
                ) from None
            if message["type"] == "http.disconnect":
                client = scope.get("client") or ("-", 0)
                log.info("client %s:%s went away while sending %s %s", *client, scope["method"], scope["path"])
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)


def _same_site(origin: str, host: str) -> bool:
    """Whether a browser ``Origin`` is a loopback address or the server's own ``Host``."""
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False  # "null" (a file or sandboxed page) and the like
    return is_loopback(parts.hostname) or parts.netloc.lower() == host.lower()


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that gives the app the body read already, then passes through (disconnects)."""
    sent = False

    async def replayed() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _refuse(scope: Scope, receive: Any, send: Any, error: ApiError) -> None:
    anthropic = scope["path"].rstrip("/") == "/v1/messages"
    body = error.anthropic_body() if anthropic else error.openai_body()
    headers = dict(error.headers)
    if error.status in (408, 413):
        headers["Connection"] = "close"  # the rest of the body is not read
    await JSONResponse(body, status_code=error.status, headers=headers)(scope, receive, send)
