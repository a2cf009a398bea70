"""The console's Host check: an ASGI middleware refusing requests for a host name it does not answer.

A web page can point a name it controls at 127.0.0.1 (DNS rebinding) and then read the console
as its own origin; the browser still sends that name in ``Host``. Refusing every request (page,
websocket, data routes) whose ``Host`` is not one of ``loader.hosts.allowed_hosts()`` stops it.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from loader.hosts import allowed_hosts, parse_host

REFUSED = (b"400 Bad Request: this console does not answer to this Host name. If the name is yours, "
           b"add it to ETL_ALLOWED_HOSTS.\n")


class HostCheck:
    """Pass ``http`` and ``websocket`` requests whose Host is allowed; refuse the others with no data.

    HTTP gets 400 (text/plain); a websocket handshake is closed before it is accepted, which the
    server answers with 403. ``hosts`` defaults to ``allowed_hosts()``, read once at start.

    Example::

        app = st.App("Home.py", routes=routes(), middleware=[Middleware(HostCheck)])
    """

    def __init__(self, app: ASGIApp, hosts: Iterable[str] | None = None) -> None:
        self.app = app
        self.hosts = frozenset(allowed_hosts() if hosts is None else hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self.allows(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            message = await receive()
            if message["type"] == "websocket.connect":
                await send({"type": "websocket.close", "code": 1008, "reason": "host not allowed"})
            return
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(REFUSED)).encode()),
                                (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": REFUSED})

    def allows(self, scope: Scope) -> bool:
        """Whether the request's one Host header names an allowed host (none, or two, is refused)."""
        values = [v for k, v in scope.get("headers", ()) if k == b"host"]
        if len(values) != 1:
            return False
        return parse_host(values[0].decode("latin-1")) in self.hosts
