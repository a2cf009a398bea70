"""The OpenAPI document of the console's HTTP API (``/etl/data-loader/api/openapi.json``).

Written by hand next to the routes it describes (ui/routes.py), and kept true by
``tests/ui/test_openapi.py``, which fuzzes every operation from it (schemathesis) against a running
console with real runs: no 500, every answer of a declared status, type and shape.
"""

from __future__ import annotations

from typing import Any

from loader.catalog import JOB_NAME_RE
from loader.runs import SLUG_RE, UUID_RE
from loader.states import BatchStatus, RunStatus

API = "/etl/data-loader/api"


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


_INT = {"type": "integer"}
_NUM = {"type": "number"}
_STR = {"type": "string"}
_TIME = {"type": "string", "format": "date-time"}

#: One batch, as the run contract and the grid's pages give it.
BATCH: dict[str, Any] = {
    "type": "object",
    "required": ["index", "status", "status_label", "attempts", "rows_attempted", "rows_inserted", "rows_updated",
                 "validation_failures", "duration_ms", "retries", "committed_at", "error_code", "error_message",
                 "rows_validated", "rows_superseded", "source_file", "first_line", "line_count"],
    "properties": {
        "index": _INT, "status": {"type": "string", "enum": [s.value for s in BatchStatus]},
        "status_label": _STR, "attempts": _INT, "retries": _INT,
        "rows_attempted": _INT, "rows_inserted": _INT, "rows_updated": _INT, "rows_validated": _INT,
        "rows_superseded": _INT, "validation_failures": _INT,
        "duration_ms": _nullable(_NUM), "committed_at": _nullable(_TIME),
        "error_code": _nullable(_STR), "error_message": _nullable(_STR), "error_truncated": {"type": "boolean"},
        "source_file": _STR, "first_line": _INT, "line_count": _INT,
    },
}
_EVENT = {
    "type": "object", "required": ["ts", "level", "event", "job", "run", "batch", "attempt", "details"],
    "properties": {"ts": _TIME, "level": _STR, "event": _STR, "job": _STR, "run": _STR,
                   "batch": _nullable(_INT), "attempt": _nullable(_INT), "details": {"type": "object"}},
}
_ATTEMPT = {
    "type": "object",
    "required": ["attempt", "status", "trigger", "worker", "started_at", "ended_at", "duration_ms", "error_code",
                 "error_message", "error_stack"],
    "properties": {"attempt": _INT, "status": _STR, "trigger": _nullable(_STR), "worker": _nullable(_STR),
                   "started_at": _nullable(_TIME), "ended_at": _nullable(_TIME), "duration_ms": _nullable(_NUM),
                   "error_code": _nullable(_STR), "error_message": _nullable(_STR),
                   "error_stack": _nullable(_STR)},
}
_DETAIL = {
    "allOf": [BATCH, {
        "type": "object", "required": ["error_stack", "attempt_timeline", "logs_fragment"],
        "properties": {"error_stack": _nullable(_STR), "attempt_timeline": {"type": "array", "items": _ATTEMPT},
                       "logs_fragment": {"type": "array", "items": _EVENT}}}],
}
_PAGE = {
    "type": "object", "required": ["rows", "lastRow", "version", "status"],
    "properties": {"rows": {"type": "array", "items": BATCH}, "lastRow": _nullable(_INT), "version": _STR,
                   "status": {"type": "string", "enum": [s.value for s in RunStatus]}},
}
_ERROR = {"type": "object", "required": ["error"], "properties": {"error": _STR}}
#: One Server-Sent Event of the run stream, as a reader parses it (its data is JSON text).
_SSE_EVENT = {"type": "object", "required": ["event", "data", "id"],
              "properties": {"event": {"type": "string", "enum": ["run", "batch", "error"]},
                             "data": {"type": "string"}, "id": {"type": "string", "pattern": "^[0-9]+$"}}}


def _errors(*codes: int) -> dict[str, Any]:
    why = {400: "a parameter is refused (the message says which and why)",
           401: "sign-in required (ETL_AUTH proxy or oidc, and no identity)",
           403: "the person may not view this console, or (rejected records) is not an operator of the job",
           404: "no such run (or batch, or API path), or a job the person may not view",
           503: "busy, timed out or the database is away: try again after Retry-After seconds"}
    out: dict[str, Any] = {str(c): {"description": why[c],
                                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
                           for c in codes}
    if 503 in codes:
        out["503"]["headers"] = {"Retry-After": {"schema": _INT, "description": "seconds"}}
    return out


def _ok(media: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"200": {"description": description, "content": {media: {"schema": schema}}}}


_RUN_PARAMS = [
    {"name": "job", "in": "path", "required": True, "schema": {"type": "string", "pattern": JOB_NAME_RE.pattern},
     "description": "the job's name (etl_job_id)"},
    {"name": "run", "in": "path", "required": True,
     "schema": {"type": "string", "pattern": f"(?:{SLUG_RE.pattern})|(?:{UUID_RE.pattern})"},
     "description": "the run's id (etl_run_id): a slug or a UUID"},
]


def _get(summary: str, responses: dict[str, Any], params: list[dict[str, Any]] | None = None,
         description: str = "") -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "parameters": [*_RUN_PARAMS, *(params or [])],
                          "responses": {**responses, **_errors(400, 401, 403, 404, 503)}}
    if description:
        op["description"] = description
    return {"get": op}


def document() -> dict[str, Any]:
    """The OpenAPI 3.0 document; paths are relative to the server ``/etl/data-loader/api``."""
    run = "/runs/{job}/{run}"
    text = {"type": "string"}
    return {
        "openapi": "3.0.3",
        "info": {"title": "Data Loader console API", "version": "1",
                 "description": "Read a run's batches, follow it live, download its logs, metrics and rejected "
                                "records. Every answer is no-store; errors are JSON {\"error\": message}."},
        "servers": [{"url": API}],
        "paths": {
            f"{run}/batches": _get(
                "One page of the run's batches, sorted and filtered in SQL (the grid's rows)",
                _ok("application/json", _PAGE, "the page, the total of matching batches and the run's version"),
                [{"name": "start", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                 {"name": "end", "in": "query", "schema": {"type": "integer", "minimum": 0},
                  "description": "exclusive; at most 1,000 rows a page"},
                 {"name": "sort", "in": "query", "schema": text,
                  "description": "AG Grid sort model, JSON: [{\"colId\": \"rows_attempted\", \"sort\": \"asc\"}]"},
                 {"name": "filter", "in": "query", "schema": text,
                  "description": "AG Grid filter model, JSON: {\"index\": {\"filterType\": \"number\", "
                                 "\"type\": \"greaterThan\", \"filter\": 9}}"},
                 {"name": "status", "in": "query", "schema": text,
                  "description": "comma-separated batch statuses"}]),
            f"{run}/batches/{{index}}": _get(
                "One batch with its error stack, attempt timeline and recent log events",
                _ok("application/json", _DETAIL, "the batch"),
                [{"name": "index", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}}]),
            f"{run}/version": _get(
                "An opaque token that changes whenever the run does",
                _ok("application/json", {"type": "object", "required": ["version"], "properties": {"version": _STR}},
                    "the token")),
            f"{run}/events": _get(
                "The run's changes as Server-Sent Events",
                _ok("text/event-stream", _SSE_EVENT,
                    "events `run` (data: the run contract without batches, JSON) and `batch` (data: one batch, "
                    "JSON), each with its change number as id; ends after the final status"),
                [{"name": "Last-Event-ID", "in": "header", "schema": text,
                  "description": "resume after this event id (a change number)"}]),
            f"{run}/logs.ndjson": _get("The run's log events, one JSON object a line",
                                       _ok("application/x-ndjson", text, "the log events")),
            f"{run}/metrics.csv": _get("The run's metrics as CSV", _ok("text/csv", text, "one header and one row")),
            f"{run}/rejects.ndjson": _get("The run's rejected records, one JSON object a line",
                                          _ok("application/x-ndjson", text, "the rejected records")),
            "/openapi.json": {"get": {"summary": "This document", "responses": {**_ok(
                "application/json", {"type": "object"}, "the OpenAPI document"), **_errors(401, 403, 503)}}},
        },
        "components": {"schemas": {"Error": _ERROR, "Batch": BATCH}},
    }
