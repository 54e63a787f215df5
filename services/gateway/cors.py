"""CORS for the OpenAI HTTP API: browser front-ends on the origins an operator lists.

Off unless ``--cors-origin`` names origins: without CORS headers a browser lets no page
read the API's answers, which is the safe default. Credentials are bearer tokens a page
sends itself (never cookies), so ``*`` is allowed too; ``Access-Control-Allow-Credentials``
is never sent. Preflights (OPTIONS with ``Access-Control-Request-Method``) carry no
credential and are answered before authentication, as the CORS specification requires.
Headers go on in ``on_response_prepare``, so server-sent event streams get them too (their
headers leave before the handler returns).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection

from aiohttp import web

PREFLIGHT_MAX_AGE_S = 600
"""How long a browser may reuse a preflight's answer."""
METHODS = "GET, POST"
EXPOSED = "x-request-id, retry-after"
"""Response headers a page may read: the gateway's request id (support), Retry-After (429)."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Cors:
    """The allowed origins (``*``: any), as middleware and a response-prepare hook."""

    def __init__(self, origins: Collection[str]) -> None:
        self.any = "*" in origins
        self.origins = frozenset(o.rstrip("/") for o in origins if o != "*")

    def install(self, app: web.Application) -> None:
        app.middlewares.insert(0, self.preflight)
        app.on_response_prepare.append(self.add_headers)

    def allowed(self, origin: str | None) -> str | None:
        """The Access-Control-Allow-Origin value for ``origin``; None: not allowed."""
        if not origin:
            return None
        if self.any:
            return "*"
        return origin if origin in self.origins else None

    @web.middleware
    async def preflight(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return await handler(request)
        allow = self.allowed(request.headers.get("Origin"))
        if allow is None:
            raise web.HTTPForbidden(reason="origin not allowed")
        headers = {
            "Access-Control-Allow-Origin": allow,
            "Access-Control-Allow-Methods": METHODS,
            "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
            "Vary": "Origin",
        }
        asked = request.headers.get("Access-Control-Request-Headers")
        if asked:  # authorization cannot be covered by "*": echo what the page will send
            headers["Access-Control-Allow-Headers"] = asked
        return web.Response(status=204, headers=headers)

    async def add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        allow = self.allowed(request.headers.get("Origin"))
        if allow is None or "Access-Control-Allow-Origin" in response.headers:
            return
        response.headers["Access-Control-Allow-Origin"] = allow
        response.headers["Access-Control-Expose-Headers"] = EXPOSED
        response.headers.add("Vary", "Origin")
