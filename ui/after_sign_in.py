"""Under ETL_AUTH=oidc, a deep link survives the round trip through the provider.

Streamlit's sign-in callback always lands on the app's base path (``/etl/``), which would lose the run
a link named. The page's Sign in link goes through :func:`sign_in` instead: it keeps the page the person
asked for in a short-lived cookie (only a job and a run id, checked, rebuilt into the console's own path:
never a URL from outside), then starts Streamlit's own sign-in; :class:`AfterSignIn` sends the browser
arriving on the base path with that cookie on to the page, once, and deletes the cookie.
"""

from __future__ import annotations

from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from loader.access import AuthMode, auth_mode
from loader.catalog import JOB_NAME_RE
from loader.runs import SLUG_RE, UUID_RE

#: The cookie that holds where to go after the sign-in (a path of the console, rebuilt when read).
COOKIE = "dl_after_sign_in"
#: Seconds a sign-in may take before the page asked for is forgotten.
COOKIE_SECONDS = 600
#: Where Streamlit's sign-in callback lands (server.baseUrlPath "etl").
BASE = "/etl"


def page_after_sign_in(job: str | None, run: str | None) -> str:
    """The console's own path for a job and a run id, when they are well-formed; the page otherwise.

    Example::

        >>> page_after_sign_in("orders", "nightly-1")
        '/etl/data-loader?job=orders&run=nightly-1'
        >>> page_after_sign_in("<script>", None)
        '/etl/data-loader'
    """
    from .routes import PAGE_PATH

    query = {}
    if job and JOB_NAME_RE.match(job):
        query["job"] = job
        if run and (SLUG_RE.match(run) or UUID_RE.match(run)):
            query["run"] = run
    return f"{PAGE_PATH}?{urlencode(query)}" if query else PAGE_PATH


def sign_in(request: Request) -> Response:
    """GET /etl/data-loader/api/sign-in?job=&run=: remember the page, then Streamlit's sign-in (oidc only)."""
    from streamlit.user_info import generate_login_redirect_url

    if auth_mode() is not AuthMode.OIDC:
        return Response("Not Found", status_code=404, media_type="text/plain")
    target = page_after_sign_in(request.query_params.get("job"), request.query_params.get("run"))
    response = RedirectResponse(generate_login_redirect_url("default"), status_code=303)
    response.set_cookie(COOKIE, target, max_age=COOKIE_SECONDS, path=BASE, httponly=True, samesite="lax")
    return response


class AfterSignIn:
    """ASGI middleware: a GET of the base path carrying :data:`COOKIE` goes on to the page it names, once."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") == "GET" and scope.get("path") in (BASE, f"{BASE}/"):
            request = Request(scope)
            kept = request.cookies.get(COOKIE)
            if kept is not None:
                from urllib.parse import parse_qs, urlsplit

                query = parse_qs(urlsplit(kept).query)
                target = page_after_sign_in(next(iter(query.get("job", [])), None),
                                            next(iter(query.get("run", [])), None))
                response = RedirectResponse(target, status_code=303)
                response.delete_cookie(COOKIE, path=BASE)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
