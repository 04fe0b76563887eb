"""The per-session token (as Jupyter's): required on every HTTP request and on the websocket.

The URL printed at start carries ``?token=...``; the first request with it gets an HttpOnly, SameSite=Strict
cookie and a redirect to the same page without the token, so later requests (scripts, styles, the websocket)
carry the cookie. A request with neither a valid cookie nor a valid token is answered ``403`` and never reaches
trame. Websocket upgrades must also come from the page's own origin (no cross-site websocket hijacking).
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

COOKIE = "medtune_studio_token"
QUERY = "token"
REFUSED = "MedTune Studio: this session needs its token - open the URL printed when `medtune studio` started."


def new_token() -> str:
    """A random 32-byte URL-safe token."""
    return secrets.token_urlsafe(32)


def _same(a: str | None, b: str) -> bool:
    return a is not None and hmac.compare_digest(a.encode(), b.encode())


def token_middleware(token: str) -> Callable[..., Awaitable[Any]]:
    """An aiohttp middleware refusing every request without the session's token."""
    from aiohttp import web

    @web.middleware
    async def check_token(request: web.Request, handler: Callable[..., Awaitable[Any]]) -> Any:
        if _same(request.query.get(QUERY), token):
            query = {k: v for k, v in request.query.items() if k != QUERY}
            target = request.rel_url.with_query(query)
            response = web.HTTPFound(str(target))
            response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/")
            raise response
        if not _same(request.cookies.get(COOKIE), token):
            return web.Response(status=403, text=REFUSED + "\n")
        if request.headers.get("Upgrade", "").lower() == "websocket":
            origin = request.headers.get("Origin")
            if origin is not None and urlsplit(origin).netloc != request.host:
                return web.Response(status=403, text="MedTune Studio: websocket from another origin refused.\n")
        return await handler(request)

    return check_token
