"""HTTP routes served next to the Streamlit page: deep links, the grid's JSON pages and the downloads.

They are mounted by ``Home.py`` through ``st.App(routes=...)``; every path starts with
``/etl/data-loader/`` (never ``/etl/_stcore/...``). Each parameter is checked, values are bound in
SQL by the engine, and errors come back as JSON with a 4xx/5xx status.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlencode

import sqlalchemy as sa
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

import loader
from loader import db
from loader.catalog import JOB_NAME_RE
from loader.contract import signature_token
from loader.errors import ConfigError, LoaderError, RunNotFound
from loader.runs import SLUG_RE, UUID_RE

from .grid_state import has_js_code_marker

#: Where the console page lives (server.baseUrlPath "etl" + st.Page url_path "data-loader").
PAGE_PATH = "/etl/data-loader"
API_PATH = f"{PAGE_PATH}/api/runs"
NO_STORE = {"Cache-Control": "no-store"}


class BadRequest(Exception):
    """A parameter the routes refuse; ``str()`` says which and why."""


def check_ids(job: str, run: str) -> tuple[str, str]:
    """The job and run ids of a URL, or BadRequest."""
    if not JOB_NAME_RE.match(job):
        raise BadRequest(f"not a job id: {job[:80]!r}")
    if not (SLUG_RE.match(run) or UUID_RE.match(run)):
        raise BadRequest(f"not a run id (UUID or slug): {run[:80]!r}")
    return job, run.lower() if UUID_RE.match(run) else run


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=NO_STORE)


def _guard(handler: Callable[[Request], Response]) -> Callable[[Request], Response]:
    """Map errors to what the caller sees: 400 bad parameter, 404 unknown run, 503 database down."""

    def endpoint(request: Request) -> Response:
        if any(has_js_code_marker(k) or has_js_code_marker(v) for k, v in request.query_params.multi_items()):
            return _error(400, "a query parameter holds the grid's JS-code marker ('::JSCODE::'): refused")
        try:
            return handler(request)
        except BadRequest as exc:
            return _error(400, str(exc))
        except RunNotFound as exc:
            return _error(404, str(exc))
        except ConfigError as exc:
            return _error(400, str(exc))
        except loader.TransientDbError as exc:
            return _error(503, str(exc))
        except LoaderError as exc:
            return _error(400, str(exc))
        except sa.exc.OperationalError as exc:
            return _error(503, str(db.wrap_db_error(exc)))

    endpoint.__name__ = handler.__name__
    return endpoint


def _ids(request: Request) -> tuple[str, str]:
    return check_ids(request.path_params["job"], request.path_params["run"])


def _json_param(request: Request, name: str) -> Any:
    from loader.grid import parse_json_param

    return parse_json_param(name, request.query_params.get(name))


def batches_page(request: Request) -> Response:
    """GET .../batches?start=0&end=100&sort=[...]&filter={...}&status=failed,retried"""
    from loader import grid

    job, run = _ids(request)
    p = request.query_params
    q = grid.parse_query(p.get("start", 0), p.get("end", 100), _json_param(request, "sort"),
                         _json_param(request, "filter"), p.get("status") or None)
    return JSONResponse(grid.batch_page(job, run, q), headers=NO_STORE)


def batch_detail(request: Request) -> Response:
    """GET .../batches/<index>: one batch with its error stack, attempts and log events."""
    from loader import grid

    job, run = _ids(request)
    index = int(request.path_params["index"])
    detail = grid.batch_detail(job, run, index) if 0 <= index <= grid.MAX_NUMBER else None
    if detail is None:
        return _error(404, f"no batch {request.path_params['index']} in run {run!r}")
    return JSONResponse(detail, headers=NO_STORE)


def version(request: Request) -> Response:
    """GET .../version: an opaque token that changes whenever the run does, late commits included (the
    grid polls it and compares it with the one of its last page)."""
    job, run = _ids(request)
    return JSONResponse({"version": signature_token(loader.change_signature(job, run))}, headers=NO_STORE)


def _stream(chunks: Iterator[bytes], media_type: str, filename: str) -> StreamingResponse:
    first = next(chunks, b"")  # RunNotFound and database errors surface here, before the headers
    return StreamingResponse(itertools.chain([first], chunks), media_type=media_type,
                             headers={"Content-Disposition": f'attachment; filename="{filename}"', **NO_STORE})


def logs_ndjson(request: Request) -> Response:
    job, run = _ids(request)
    return _stream(loader.iter_logs_ndjson(job, run), "application/x-ndjson", f"{job}-{run}-logs.ndjson")


def metrics_csv(request: Request) -> Response:
    job, run = _ids(request)
    return _stream(loader.iter_metrics_csv(job, run), "text/csv; charset=utf-8", f"{job}-{run}-metrics.csv")


def rejects_ndjson(request: Request) -> Response:
    job, run = _ids(request)
    return _stream(loader.iter_rejects_ndjson(job, run), "application/x-ndjson", f"{job}-{run}-rejects.ndjson")


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


def routes() -> list[BaseRoute]:
    """The routes to give ``st.App``; API routes first so a job named ``api`` cannot shadow them."""
    run = API_PATH + "/{job}/{run}"
    return [
        Route(run + "/batches", _guard(batches_page), methods=["GET"]),
        Route(run + "/batches/{index:int}", _guard(batch_detail), methods=["GET"]),
        Route(run + "/version", _guard(version), methods=["GET"]),
        Route(run + "/logs.ndjson", _guard(logs_ndjson), methods=["GET"]),
        Route(run + "/metrics.csv", _guard(metrics_csv), methods=["GET"]),
        Route(run + "/rejects.ndjson", _guard(rejects_ndjson), methods=["GET"]),
        Route(PAGE_PATH + "/{rest:path}", deep_link, methods=["GET"]),
        Route("/", root, methods=["GET"]),
    ]
