"""Who is using the console: the identity of a page session or of an HTTP request, and what it may do.

The rules are loader/access.py's; this module only finds the person. Under ``ETL_AUTH=proxy`` the
identity is the ``ETL_AUTH_HEADER`` header, believed only when the TCP peer is in
``ETL_TRUSTED_PROXIES``: for the page, the peer and the headers of the session's websocket handshake
(Streamlit keeps both for the session's life); for a route, the request's. Uvicorn would replace the
peer by the address an ``X-Forwarded-For`` header names when the peer is one it trusts
(``FORWARDED_ALLOW_IPS``); :func:`keep_the_tcp_peer` stops that in the console's process, so the peer
checked is always the one that connected. Under ``oidc`` it is Streamlit's ``st.user`` email claim
(the page; routes read the same signed identity cookie through Streamlit's own parser).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loader import config
from loader.access import NOBODY, AuthMode, JobAccess, Rules, auth_mode, identify, rules
from loader.audit import ANONYMOUS
from loader.catalog import Catalog, load_catalog
from loader.errors import LoaderError

if TYPE_CHECKING:
    from starlette.requests import Request

#: What a viewer reads on an action they may not take (a screen reader announces it with the button).
OPERATORS_ONLY = "operators only"


@dataclass(frozen=True)
class Person:
    """The person behind a page session or a request (``email`` None: nobody identified) and the rules."""

    email: str | None
    rules: Rules

    @property
    def actor(self) -> str:
        """The name the audit trail records: the e-mail, or ``anonymous`` under ``ETL_AUTH=none``."""
        return self.email or ANONYMOUS

    @property
    def signed_in(self) -> bool:
        """Identified, or under ``none`` (where nobody needs to be)."""
        return self.rules.mode is AuthMode.NONE or self.email is not None

    def may_use_console(self) -> bool:
        """Admitted by ``ETL_VIEWERS`` (whatever the jobs say)."""
        return self.rules.may_view(self.email)

    def may_view(self, job: str) -> bool:
        """May see the job: it appears nowhere (selects, recent runs, links, routes) for anyone else."""
        return self.rules.may_view(self.email, job_access(job))

    def may_operate(self, job: str) -> bool:
        """May start, retry, cancel and force-start runs of the job and download its rejected records."""
        return self.rules.may_operate(self.email, job_access(job))

    def hidden_jobs(self) -> list[str]:
        """The catalog's jobs (valid or broken) this person may not view: left out of every list."""
        catalog = current_catalog()
        if catalog is None or self.rules.mode is AuthMode.NONE:
            return []
        return sorted(j for j in (*catalog.jobs, *catalog.errors) if not self.may_view(j))

    def may_see_broken_jobs(self) -> bool:
        """Broken jobs of the catalog (their names and errors) are shown to operators only, under a sign-in
        mode: their own ``viewers`` cannot be read, so they are nobody's to view."""
        return self.rules.mode is AuthMode.NONE or self.rules.may_operate(self.email)


def job_access(job: str) -> JobAccess | None:
    """The job's own roles from the catalog as it is now (None: the catalog does not narrow them).

    A job the catalog holds but cannot read (broken) is viewed by nobody under a sign-in mode: its
    ``viewers`` may be what is broken. A job no longer in the catalog has only the global rules.
    """
    catalog = current_catalog()
    if catalog is None:
        # Never read (missing, or broken since the console started): under a sign-in mode nobody may view
        # any job, rather than every viewer every job (a job's own narrowing would be lost with the file).
        return None if auth_mode() is AuthMode.NONE else JobAccess(viewers=NOBODY, operators=NOBODY)
    spec = catalog.jobs.get(job)
    if spec is not None:
        return spec.access
    if job in catalog.errors:
        return JobAccess(viewers=NOBODY, operators=NOBODY)
    return None


_catalog_cache: dict[tuple[str, int, int], Catalog] = {}
#: The last catalog read whole, by path: a file caught half-written, or broken by an edit, keeps the roles
#: it gave until it reads again.
_last_good: dict[str, Catalog] = {}


def current_catalog() -> Catalog | None:
    """The catalog file as it is now, read again only when its size or modification time changed; when it
    cannot be read, the last one read whole; None when none ever was (see :func:`job_access`)."""
    path = config.jobs_file().resolve()
    try:
        st = path.stat()
    except OSError:
        return _last_good.get(str(path))
    stamp = (str(path), st.st_mtime_ns, st.st_size)
    found = _catalog_cache.get(stamp)
    if found is None:
        try:
            found = load_catalog(path)
        except LoaderError:
            return _last_good.get(str(path))
        _catalog_cache.clear()
        _catalog_cache[stamp] = found
        _last_good[str(path)] = found
    return found


def header_value(values: list[str]) -> str | None:
    """The identity header's one value; two or more (a client adding its own beside the proxy's) is none."""
    return values[0] if len(values) == 1 else None


def person_from(mode: AuthMode, *, header_values: list[str], peer: str | None, oidc_email: str | None) -> Person:
    """The person a request or a session shows, by the mode in force."""
    return Person(identify(mode, header_value=header_value(header_values), peer=peer, oidc_email=oidc_email),
                  rules())


def keep_the_tcp_peer() -> None:
    """Make uvicorn leave the peer address alone (no ``X-Forwarded-For`` rewriting), under ``proxy``.

    Uvicorn replaces a request's peer by the address ``X-Forwarded-For`` names when the peer is one of
    ``FORWARDED_ALLOW_IPS`` (127.0.0.1 and ::1 by default). Behind a proxy on loopback the peer would then
    be the browser's address, not the proxy's, and the identity header of every proxied request would be
    ignored. ``streamlit run`` builds uvicorn's configuration (reading ``FORWARDED_ALLOW_IPS``) before it
    imports ``Home.py``, but wraps the app in the middleware after: ``Home.py`` calls this when the server
    imports it, and the middleware uvicorn then builds trusts no forwarded address. The browser test
    ``test_a_spoofed_identity_header_from_an_untrusted_peer_is_ignored_by_the_routes_and_the_page`` sends
    ``X-Forwarded-For`` from the trusted proxy and fails if this stops working with a newer uvicorn.
    """
    if auth_mode() is not AuthMode.PROXY:
        return
    import uvicorn.config
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    class PeerKeeping(ProxyHeadersMiddleware):
        """Uvicorn's proxy-headers middleware trusting no peer: ``scope["client"]`` stays the TCP peer."""

        def __init__(self, app: Any, trusted_hosts: list[str] | str = "") -> None:
            super().__init__(app, trusted_hosts=[])

    uvicorn.config.ProxyHeadersMiddleware = PeerKeeping  # type: ignore[attr-defined]


def request_person(request: Request) -> Person:
    """The person making an HTTP request to one of the console's routes (ui/routes.py)."""
    mode = auth_mode()
    if mode is AuthMode.PROXY:
        values = request.headers.getlist(config.get("ETL_AUTH_HEADER"))
        return person_from(mode, header_values=values, peer=request.client.host if request.client else None,
                           oidc_email=None)
    if mode is AuthMode.OIDC:
        return person_from(mode, header_values=[], peer=None, oidc_email=_signed_in_email(request))
    return person_from(mode, header_values=[], peer=None, oidc_email=None)


def _signed_in_email(request: Request) -> str | None:
    """The email claim of Streamlit's sign-in cookie (``_streamlit_user``, signed with the server's cookie
    secret, set by ``st.login``'s callback), read with Streamlit's own parser; None when absent, forged or
    signed out. The same cookie the page's websocket session reads for ``st.user``."""
    import json

    from streamlit.web.server.starlette.starlette_auth_routes import _get_cookie_value_from_request
    from streamlit.web.server.starlette.starlette_server_config import USER_COOKIE_NAME

    raw = _get_cookie_value_from_request(request, USER_COOKIE_NAME)
    if raw is None:
        return None
    try:
        payload = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(payload, dict) or payload.get("is_logged_in") is not True:
        return None
    email = payload.get("email")
    if payload.get("email_verified") is False:  # the provider says it did not check it: anyone could claim it
        return None
    return email if isinstance(email, str) else None


def session_person() -> Person:
    """The person of this page session: what its websocket handshake showed (headers, TCP peer), or the
    OIDC sign-in; read at each script run, so a setting changed applies at the next rerun."""
    import streamlit as st

    mode = auth_mode()
    if mode is AuthMode.PROXY:
        values = st.context.headers.get_all(config.get("ETL_AUTH_HEADER"))
        return person_from(mode, header_values=values, peer=_session_peer(), oidc_email=None)
    if mode is AuthMode.OIDC:
        email = st.user.get("email") if st.user.is_logged_in else None
        if st.user.get("email_verified") is False:  # the provider did not check it: anyone could claim it
            email = None
        return person_from(mode, header_values=[], peer=None, oidc_email=str(email) if email else None)
    return Person(None, rules())


def _session_peer() -> str | None:
    """The TCP peer of this session's websocket (``st.context.ip_address`` hides loopback peers, which
    are exactly the proxies one trusts most often)."""
    from streamlit.runtime import get_instance
    from streamlit.runtime.scriptrunner_utils.script_run_context import get_script_run_ctx

    ctx = get_script_run_ctx()
    if ctx is None:
        return None
    client = get_instance().get_client(ctx.session_id)
    context = getattr(client, "client_context", None) if client is not None else None
    return getattr(context, "remote_ip", None)


def page_person() -> Person:
    """The person ``Home.py`` admitted at this script run (pages and their fragments read it from there)."""
    import streamlit as st

    found = st.session_state.get("dl_person")
    return found if isinstance(found, Person) else session_person()


def operator_label(label: str, allowed: bool) -> str:
    """A button's label, with the reason it is disabled in the label itself when the person may not act:
    the reason is then visible text and part of the button's accessible name, which a screen reader
    reads with "dimmed" (a tooltip on a disabled button is reached by neither keyboard nor reader)."""
    return label if allowed else f"{label} ({OPERATORS_ONLY})"
