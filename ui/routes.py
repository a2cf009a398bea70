"""HTTP routes served next to the Streamlit page: deep links, the grid's JSON pages and the downloads.

They are mounted by ``Home.py`` through ``st.App(routes=...)``; every path starts with
``/etl/data-loader/`` (never ``/etl/_stcore/...``). Each parameter is checked, values are bound in
SQL by the engine, and errors come back as JSON with a 4xx/5xx status.

No request starves the console: the data routes (grid pages, batch details, downloads) take a slot
of a per-process :class:`Limiter` (``ETL_CONSOLE_MAX_REQUESTS``) or answer 503 with ``Retry-After`` at
once (open downloads have as many slots of their own, and hold a data slot only while they read the
database, not while their client reads); every read runs under the console's statement timeout
(``ETL_CONSOLE_STATEMENT_TIMEOUT``, see :func:`configure_process`), and a canceled statement is a
503 too, never a 500.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import quote, urlencode

import orjson
import psycopg
import sqlalchemy as sa
from psycopg_pool import PoolTimeout
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

import loader
from loader import config, db, ledger
from loader.catalog import JOB_NAME_RE
from loader.contract import signature_token
from loader.errors import ConfigError, LedgerNotReady, LoaderError, RunNotFound, TransientDbError
from loader.runs import SLUG_RE, UUID_RE

from .grid_state import has_js_code_marker
from .identity import OPERATORS_ONLY, request_person

#: Where the console page lives (server.baseUrlPath "etl" + st.Page url_path "data-loader").
PAGE_PATH = "/etl/data-loader"
API_PATH = f"{PAGE_PATH}/api/runs"
NO_STORE = {"Cache-Control": "no-store"}


def run_path(job: str, run: str) -> str:
    """The deep link of one run's monitor, each id percent-encoded: ``/etl/data-loader/<job>/<run>``."""
    return f"{PAGE_PATH}/{quote(job, safe='')}/{quote(run, safe='')}"

#: Seconds a client is told to wait (``Retry-After``) when the console is busy or a query timed out.
RETRY_AFTER = 1
#: Bytes gathered from a download's lines before they are sent (one thread hop per chunk, not per line).
STREAM_CHUNK = 64 * 1024
#: Seconds a download already streaming waits for a data slot to produce its next chunk before it
#: gives up (the client then sees the download fail, not a truncated file that looks whole).
STREAM_SLOT_WAIT = 30.0


class BadRequest(Exception):
    """A parameter the routes refuse; ``str()`` says which and why."""


class Busy(Exception):
    """Every slot of the console's :class:`Limiter` is taken; ``str()`` says so and what to do."""


def configure_process() -> None:
    """Put this process's database reads under ``ETL_CONSOLE_STATEMENT_TIMEOUT`` (the console's, not a worker's).

    Called by ``Home.py`` once when the console's server starts, before any page or request reads the
    ledger.
    """
    db.set_read_timeout(config.get_float("ETL_CONSOLE_STATEMENT_TIMEOUT"))


def refuse_a_ledger_behind() -> None:
    """Exit the console's server, naming the command to run, when the ledger is missing or behind this code.

    Called by ``Home.py`` once when the server starts: code newer than its ledger would fail on every
    page. An unreachable database is not a refusal: the pages say so and keep trying, as before.
    """
    import sys

    try:
        ledger.check_ready()
    except TransientDbError:
        return
    except LedgerNotReady as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


class Limiter:
    """At most ``size`` holders at once in this process; one more is refused at once (or after ``wait``).

    Nothing waits in a queue without end: :meth:`enter` takes a slot or raises :class:`Busy`. The slot
    is given back by the returned function (idempotent).

    Example::

        release = limiter().enter()
        try:
            ...
        finally:
            release()
    """

    def __init__(self, size: int, what: str) -> None:
        self.size = size
        self.what = what
        self._free = threading.BoundedSemaphore(size)

    def enter(self, wait: float = 0) -> Callable[[], None]:
        """Take a slot, waiting at most ``wait`` seconds for one; Busy when none came."""
        if not self._free.acquire(timeout=wait) if wait > 0 else not self._free.acquire(blocking=False):
            raise Busy(f"the console is busy: {self.size} {self.what} already (ETL_CONSOLE_MAX_REQUESTS); "
                       "try again in a moment")
        lock = threading.Lock()
        held = [True]

        def release() -> None:
            with lock:
                if held[0]:
                    held[0] = False
                    self._free.release()

        return release


_limiters: dict[tuple[str, int], Limiter] = {}
_limiters_lock = threading.Lock()


def _limiter(kind: str, what: str) -> Limiter:
    size = config.get_int("ETL_CONSOLE_MAX_REQUESTS", minimum=1)  # read at each call: tests change it
    with _limiters_lock:
        return _limiters.setdefault((kind, size), Limiter(size, what))


def limiter() -> Limiter:
    """This process's slots for work in the database: grid pages, batch details, and each chunk a
    download produces (``ETL_CONSOLE_MAX_REQUESTS`` of them)."""
    return _limiter("data", "data requests are running")


def streams() -> Limiter:
    """This process's slots for open downloads, one each for its whole life, with its own connection
    (``ETL_CONSOLE_MAX_REQUESTS`` of them)."""
    return _limiter("streams", "downloads are being streamed")


def check_ids(job: str, run: str) -> tuple[str, str]:
    """The job and run ids of a URL, or BadRequest."""
    if not JOB_NAME_RE.match(job):
        raise BadRequest(f"not a job id: {job[:80]!r}")
    if not (SLUG_RE.match(run) or UUID_RE.match(run)):
        raise BadRequest(f"not a run id (UUID or slug): {run[:80]!r}")
    return job, run.lower() if UUID_RE.match(run) else run


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=NO_STORE)


def _busy(message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=503,
                        headers={**NO_STORE, "Retry-After": str(RETRY_AFTER)})


#: What a route asks of the person: to view the run's job, to operate it (rejected records: raw source
#: data), or only to be admitted to the console (a deep link: it redirects to the page, which decides).
Role = str
VIEW, OPERATE, ENTER = "view", "operate", "enter"


def _refusal(request: Request, role: Role) -> Response | None:
    """401 when nobody is identified (under ``proxy`` / ``oidc``), 403 when ETL_VIEWERS does not admit the
    person, 404 (the words of an unknown run) for a job they may not view, 403 for an operator's route;
    None when the request may go on. Decided before anything else is read: a refusal says nothing more."""
    person = request_person(request)
    if not person.signed_in:
        return _error(401, "sign-in required")
    if not person.may_use_console():
        return _error(403, "you may not view this console (ETL_VIEWERS)")
    if role == ENTER:
        return None
    job, run = request.path_params.get("job", ""), request.path_params.get("run", "")
    if not person.may_view(job):
        return _error(404, str(RunNotFound(f"no run {run!r} for job {job!r}")))
    if role == OPERATE and not person.may_operate(job):
        return _error(403, f"{OPERATORS_ONLY}: rejected records hold raw source data")
    return None


def _guard(handler: Callable[[Request], Response], *, limited: bool = False, role: Role = VIEW
           ) -> Callable[[Request], Response]:
    """Map errors to what the caller sees: 401/403/404 for a person without the ``role`` (see
    :func:`_refusal`), 400 bad parameter, 404 unknown run, 503 busy, timed out or database down (with
    ``Retry-After``).

    ``limited``: the handler takes a slot of the :func:`limiter` first, and gives it back when it
    returns (a download then goes on with a :func:`streams` slot, see :class:`_Body`).
    """

    def endpoint(request: Request) -> Response:
        try:
            refused = _refusal(request, role)
        except ConfigError as exc:  # ETL_AUTH, ETL_VIEWERS... wrong: nobody is let in
            return _error(503, f"the console's sign-in settings are wrong: {exc}")
        if refused is not None:
            return refused
        if any(has_js_code_marker(k) or has_js_code_marker(v) for k, v in request.query_params.multi_items()):
            return _error(400, "a query parameter holds the grid's JS-code marker ('::JSCODE::'): refused")
        release: Callable[[], None] | None = None
        try:
            if limited:
                release = limiter().enter()
            return handler(request)
        except Busy as exc:
            return _busy(str(exc))
        except BadRequest as exc:
            return _error(400, str(exc))
        except RunNotFound as exc:
            return _error(404, str(exc))
        except ConfigError as exc:
            return _error(400, str(exc))
        except loader.TransientDbError as exc:
            return _busy(str(exc))
        except LoaderError as exc:
            return _error(400, str(exc))
        except (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError, psycopg.OperationalError,
                psycopg.InterfaceError, PoolTimeout) as exc:
            # A statement canceled by the timeout (57014) is an OperationalError too.
            return _busy(str(db.wrap_db_error(exc)))
        finally:
            if release is not None:
                release()

    endpoint.__name__ = handler.__name__
    return endpoint


def _ids(request: Request) -> tuple[str, str]:
    return check_ids(request.path_params["job"], request.path_params["run"])


def _json_param(request: Request, name: str) -> Any:
    from .grid_query import parse_json_param

    return parse_json_param(name, request.query_params.get(name))


def batches_page(request: Request) -> Response:
    """GET .../batches?start=0&end=100&sort=[...]&filter={...}&status=failed,retried"""
    from loader import browse

    from .grid_query import page_json, parse_query

    job, run = _ids(request)
    p = request.query_params
    q = parse_query(p.get("start", 0), p.get("end", 100), _json_param(request, "sort"),
                    _json_param(request, "filter"), p.get("status") or None)
    return Response(orjson.dumps(page_json(browse.batch_page(job, run, q))), media_type="application/json",
                    headers=NO_STORE)


def batch_detail(request: Request) -> Response:
    """GET .../batches/<index>: one batch with its error stack, attempts and log events."""
    from loader import browse

    job, run = _ids(request)
    index = int(request.path_params["index"])
    detail = browse.batch_detail(job, run, index) if 0 <= index <= browse.MAX_NUMBER else None
    if detail is None:
        return _error(404, f"no batch {request.path_params['index']} in run {run!r}")
    return JSONResponse(detail, headers=NO_STORE)


def version(request: Request) -> Response:
    """GET .../version: an opaque token that changes whenever the run does, late commits included (the
    grid polls it and compares it with the one of its last page)."""
    job, run = _ids(request)
    return JSONResponse({"version": signature_token(loader.change_signature(job, run))}, headers=NO_STORE)


def _chunks(lines: Iterable[bytes]) -> Iterator[bytes]:
    """Lines gathered into chunks of about :data:`STREAM_CHUNK` bytes."""
    size = STREAM_CHUNK
    buf: list[bytes] = []
    n = 0
    for line in lines:
        buf.append(line)
        n += len(line)
        if n >= size:
            yield b"".join(buf)
            buf, n = [], 0
    if buf:
        yield b"".join(buf)


class _Body:
    """A download's chunks, sent while its client reads them.

    The download keeps its :func:`streams` slot (and its dedicated connection) until the stream ends,
    fails, or is dropped unread (a client that went away), whichever comes first. It takes a
    :func:`limiter` slot only while it produces a chunk (reading the next page from the database),
    waiting at most :data:`STREAM_SLOT_WAIT` seconds for one: a client that reads slowly holds none.
    """

    def __init__(self, first: bytes, rest: Iterator[bytes], lines: Iterator[bytes],
                 release_stream: Callable[[], None]) -> None:
        self._first: bytes | None = first
        self._rest = rest
        self._lines = lines
        self._release_stream = release_stream

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        try:
            release = limiter().enter(wait=STREAM_SLOT_WAIT)
            try:
                return next(self._rest)
            finally:
                release()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        close = getattr(self._lines, "close", None)
        if close is not None:
            close()  # a generator: its `with` blocks (the dedicated connection) exit now
        self._release_stream()

    def __del__(self) -> None:
        self.close()


def _stream(lines: Iterator[bytes], media_type: str, filename: str) -> StreamingResponse:
    """Stream ``lines`` in chunks (the caller holds a :func:`limiter` slot for the first one)."""
    release_stream = streams().enter()
    try:
        rest = _chunks(lines)
        first = next(rest, b"")  # RunNotFound and database errors surface here, before the headers
    except BaseException:
        close = getattr(lines, "close", None)
        if close is not None:
            close()
        release_stream()
        raise
    return StreamingResponse(_Body(first, rest, lines, release_stream), media_type=media_type,
                             headers={"Content-Disposition": f'attachment; filename="{filename}"', **NO_STORE})


def logs_ndjson(request: Request) -> Response:
    job, run = _ids(request)
    return _stream(loader.iter_logs_ndjson(job, run), "application/x-ndjson", f"{job}-{run}-logs.ndjson")


def metrics_csv(request: Request) -> Response:
    job, run = _ids(request)
    return _stream(loader.iter_metrics_csv(job, run), "text/csv; charset=utf-8",
                   f"{job}-{run}-metrics.csv")


def rejects_ndjson(request: Request) -> Response:
    job, run = _ids(request)
    return _stream(loader.iter_rejects_ndjson(job, run), "application/x-ndjson",
                   f"{job}-{run}-rejects.ndjson")


def run_events(request: Request) -> Response:
    """GET .../events: the run's changes as Server-Sent Events (``text/event-stream``), see ui/run_feed.py.

    Events: ``run`` (data: the run contract without its batches; at once, then on every change),
    ``batch`` (data: one batch whose state changed), ``error`` (the ledger could not be read; the stream
    goes on); comments as keep-alives. Each event's ``id`` is a change number: reconnect with it as
    ``Last-Event-ID`` to get what changed meanwhile. The stream ends after the run's final status.
    """
    from . import run_feed

    job, run = _ids(request)
    after = run_feed.parse_last_event_id(request.headers.get("last-event-id"))
    if not run_feed.open_stream():
        raise Busy(f"this console already serves {run_feed.max_streams()} event streams "
                   "(ETL_CONSOLE_MAX_STREAMS): try again shortly")
    try:
        first = run_feed.first_events(job, run, after)
    except BaseException:
        run_feed.close_stream()
        raise
    return StreamingResponse(run_feed.stream(job, run, first), media_type="text/event-stream",
                             headers={**NO_STORE, "X-Accel-Buffering": "no"})


def openapi(request: Request) -> Response:
    """GET /etl/data-loader/api/openapi.json: the OpenAPI document of these routes (ui/openapi.py)."""
    from .openapi import document

    return JSONResponse(document(), headers=NO_STORE)


def deep_link(request: Request) -> Response:
    """/etl/data-loader/<job>/<run> -> the page with ?job=&run= (ids are checked by the page).

    Any other path below the page goes there too (``<job>`` alone, or a run id holding a '/' or
    ``%2F``: ``run`` is then the rest of the path), so that the page says what is wrong with the
    link; Streamlit itself would serve a blank page for it. Streamlit's frontend probes
    ``<page path>/_stcore/health`` to find the server's base path: those (any path with a segment
    starting with '_', Streamlit's own) must stay 404 here, never redirect; so do unknown API paths.
    """
    rest = request.path_params["rest"].strip("/")
    parts = rest.split("/")
    if any(p.startswith("_") for p in parts):
        return Response("Not Found", status_code=404, media_type="text/plain")
    if request.url.path.startswith(API_PATH + "/"):
        return _error(404, "no such API path")
    query = {"job": parts[0], "run": "/".join(parts[1:])} if len(parts) > 1 else {"job": parts[0]} if rest else {}
    return RedirectResponse(f"{PAGE_PATH}?{urlencode(query)}" if query else PAGE_PATH, status_code=307)


def root(request: Request) -> Response:
    return RedirectResponse(PAGE_PATH, status_code=307)


def _door(handler: Callable[[Request], Response]) -> Callable[[Request], Response]:
    """A redirect to the page (no data) for an admitted person. Under ``oidc`` it stays open to anyone, so
    that a deep link survives the round trip through the provider: the page itself asks to sign in."""

    def endpoint(request: Request) -> Response:
        from loader.access import AuthMode, auth_mode

        try:
            if auth_mode() is not AuthMode.OIDC and (refused := _refusal(request, ENTER)) is not None:
                return refused
        except ConfigError as exc:
            return _error(503, f"the console's sign-in settings are wrong: {exc}")
        return handler(request)

    endpoint.__name__ = handler.__name__
    return endpoint


def routes() -> list[BaseRoute]:
    """The routes to give ``st.App``; API routes first so a job named ``api`` cannot shadow them."""
    from .after_sign_in import sign_in

    run = API_PATH + "/{job}/{run}"
    return [
        Route(run + "/batches", _guard(batches_page, limited=True), methods=["GET"]),
        Route(run + "/batches/{index:int}", _guard(batch_detail, limited=True), methods=["GET"]),
        Route(run + "/version", _guard(version), methods=["GET"]),
        Route(run + "/logs.ndjson", _guard(logs_ndjson, limited=True), methods=["GET"]),
        Route(run + "/metrics.csv", _guard(metrics_csv, limited=True), methods=["GET"]),
        Route(run + "/rejects.ndjson", _guard(rejects_ndjson, limited=True, role=OPERATE), methods=["GET"]),
        Route(run + "/events", _guard(run_events), methods=["GET"]),
        Route(PAGE_PATH + "/api/openapi.json", _guard(openapi, role=ENTER), methods=["GET"]),
        Route(f"{PAGE_PATH}/api/sign-in", sign_in, methods=["GET"]),
        Route(PAGE_PATH + "/{rest:path}", _door(deep_link), methods=["GET"]),
        Route("/", _door(root), methods=["GET"]),
    ]
