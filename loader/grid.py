"""Server-side paging, sorting and filtering of one run's batches, for the console's grid."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from . import db
from .contract import (
    batch_dict,
    batch_rows_query,
    change_signature,
    event_dict,
    get_run_row,
    iso,
    signature_token,
)
from .errors import ConfigError
from .ledger import attempts, batches, events
from .states import BatchStatus

#: Largest page the grid may ask for in one request.
MAX_PAGE_ROWS = 500
#: Largest row number a page may end at (far beyond any run; keeps OFFSET within bigint).
MAX_ROW = 10**12
#: Largest absolute value a number filter may hold: PostgreSQL's integer (NaN and infinities fail too).
MAX_NUMBER = 2**31 - 1
#: Longest error message sent in a grid row; the full text is in the batch detail.
GRID_ERROR_CHARS = 240
#: Log events shown in a batch's detail.
DETAIL_EVENTS = 50

#: Grid column id -> ledger column. Only these can be sorted or filtered.
COLUMNS: dict[str, sa.ColumnElement[Any]] = {
    "index": batches.c.batch_index,
    "attempts": batches.c.attempts,
    "rows_attempted": batches.c.rows_attempted,
    "rows_inserted": batches.c.rows_inserted,
    "rows_updated": batches.c.rows_updated,
    "validation_failures": batches.c.validation_failures,
    "duration_ms": batches.c.duration_ms,
    "status": batches.c.status,
    "committed_at": batches.c.committed_at,
    "error_code": batches.c.error_code,
    "error_message": batches.c.error_message,
}
TEXT_COLUMNS = frozenset({"status", "error_code", "error_message"})
NUMBER_COLUMNS = frozenset(COLUMNS) - TEXT_COLUMNS - {"committed_at"}
STATUSES = tuple(s.value for s in BatchStatus)

_Op = Callable[[sa.ColumnElement[Any], Any], sa.ColumnElement[bool]]

_NUMBER_OPS: dict[str, _Op] = {
    "equals": lambda c, v: c == v,
    "notEqual": lambda c, v: c != v,
    "lessThan": lambda c, v: c < v,
    "lessThanOrEqual": lambda c, v: c <= v,
    "greaterThan": lambda c, v: c > v,
    "greaterThanOrEqual": lambda c, v: c >= v,
}
_TEXT_OPS: dict[str, _Op] = {
    "contains": lambda c, v: c.icontains(v, autoescape=True),
    "notContains": lambda c, v: sa.or_(c.is_(None), sa.not_(c.icontains(v, autoescape=True))),
    "equals": lambda c, v: sa.func.lower(c) == v.lower(),
    "notEqual": lambda c, v: sa.or_(c.is_(None), sa.func.lower(c) != v.lower()),
    "startsWith": lambda c, v: c.istartswith(v, autoescape=True),
    "endsWith": lambda c, v: c.iendswith(v, autoescape=True),
}


@dataclass(frozen=True)
class GridQuery:
    """One page request: rows ``start`` (inclusive) to ``end`` (exclusive), sorted and filtered.

    ``filters`` is AG Grid's filter model (``{colId: {filterType, type, filter, filterTo}}``);
    ``statuses`` keeps only batches in those states.
    """

    start: int = 0
    end: int = 100
    sort: list[tuple[str, str]] = field(default_factory=list)
    filters: dict[str, Any] = field(default_factory=dict)
    statuses: tuple[str, ...] = ()


def parse_query(start: Any = 0, end: Any = 100, sort: Any = None, filters: Any = None,
                statuses: Any = None) -> GridQuery:
    """Check every part of a page request against the whitelist; ConfigError says what is wrong.

    Example::

        >>> parse_query(0, 50, [{"colId": "duration_ms", "sort": "desc"}]).sort
        [('duration_ms', 'desc')]
    """
    try:
        first, last = int(start), int(end)
    except (TypeError, ValueError):
        raise ConfigError(f"start and end must be whole numbers, found {start!r} and {end!r}") from None
    if first < 0 or last <= first or last - first > MAX_PAGE_ROWS or last > MAX_ROW:
        raise ConfigError(f"rows {first}..{last}: need 0 <= start < end <= {MAX_ROW} and at most "
                          f"{MAX_PAGE_ROWS} rows")
    order: list[tuple[str, str]] = []
    if sort is not None and not isinstance(sort, list):
        raise ConfigError("the sort model must be a list of {colId, sort}")
    for item in sort or []:
        if not isinstance(item, dict) or not isinstance(item.get("colId"), str) or item["colId"] not in COLUMNS \
                or item.get("sort") not in ("asc", "desc"):
            raise ConfigError(f"cannot sort by {item!r}: sortable columns are {', '.join(COLUMNS)}")
        order.append((item["colId"], item["sort"]))
    model: dict[str, Any] = {}
    if filters:
        if not isinstance(filters, dict):
            raise ConfigError("the filter model must be an object")
        for col, spec in filters.items():
            _condition(col, spec)  # raises when invalid
            model[col] = spec
    wanted: tuple[str, ...] = ()
    if statuses:
        items = [s for s in (statuses.split(",") if isinstance(statuses, str) else statuses) if s]
        bad = [s for s in items if s not in STATUSES]
        if bad:
            raise ConfigError(f"unknown batch status {bad[0]!r}: expected one of {', '.join(STATUSES)}")
        wanted = tuple(items)
    return GridQuery(first, last, order, model, wanted)


#: Longest sort or filter JSON accepted from a URL.
MAX_JSON_CHARS = 4000


def parse_json_param(name: str, raw: str | None) -> Any:
    """A sort/filter model from a URL's query string: None when absent, ConfigError when unusable.

    Capped in length, and a text nested deeper than the JSON parser goes (RecursionError) is
    refused like any other bad JSON, so neither the page nor the API shows a traceback for it.
    """
    if not raw:
        return None
    if len(raw) > MAX_JSON_CHARS:
        raise ConfigError(f"{name} is too long (at most {MAX_JSON_CHARS} characters)")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise ConfigError(f"{name} must be JSON") from None


def _number(value: Any) -> bool:
    """A JSON number the ledger's columns (PostgreSQL integer, double) can be compared with."""
    return isinstance(value, int | float) and not isinstance(value, bool) and abs(value) <= MAX_NUMBER


def _condition(col: str, spec: Any) -> sa.ColumnElement[bool]:
    if col not in COLUMNS or col == "committed_at":
        raise ConfigError(f"cannot filter on {col!r}: filterable columns are "
                          f"{', '.join(c for c in COLUMNS if c != 'committed_at')}")
    if not isinstance(spec, dict):
        raise ConfigError(f"filter on {col!r} must be an object")
    if "conditions" in spec:  # AG Grid's combined filter: {operator: AND|OR, conditions: [...]}
        if not isinstance(spec["conditions"], list):
            raise ConfigError(f"filter on {col!r}: conditions must be a list")
        parts = [_condition(col, c) for c in spec["conditions"][:2]]
        if not parts:
            raise ConfigError(f"filter on {col!r} has no conditions")
        return sa.and_(*parts) if spec.get("operator", "AND") == "AND" else sa.or_(*parts)
    column = COLUMNS[col]
    op = spec.get("type")
    if not isinstance(op, str):
        raise ConfigError(f"filter on {col!r}: type must be a text, found {op!r}"[:300])
    if op == "blank":
        return column.is_(None)
    if op == "notBlank":
        return column.is_not(None)
    value = spec.get("filter")
    if col in TEXT_COLUMNS:
        if op not in _TEXT_OPS or not isinstance(value, str) or len(value) > 200 or "\x00" in value:
            raise ConfigError(f"text filter on {col!r}: type must be one of {', '.join(_TEXT_OPS)} "
                              "with a text of at most 200 characters (and no NUL)")
        return _TEXT_OPS[op](column, value)
    if not _number(value):
        raise ConfigError(f"number filter on {col!r} needs a number within ±{MAX_NUMBER}, found {value!r}"[:300])
    if op == "inRange":
        upper = spec.get("filterTo")
        if not _number(upper):
            raise ConfigError(f"range filter on {col!r} needs filterTo within ±{MAX_NUMBER}, found {upper!r}"[:300])
        return sa.and_(column >= value, column <= upper)
    if op not in _NUMBER_OPS:
        raise ConfigError(f"number filter on {col!r}: type must be one of inRange, {', '.join(_NUMBER_OPS)}")
    return _NUMBER_OPS[op](column, value)


def _where(q: GridQuery) -> list[sa.ColumnElement[bool]]:
    conds = [_condition(col, spec) for col, spec in q.filters.items()]
    if q.statuses:
        conds.append(batches.c.status.in_(q.statuses))
    return conds


def grid_row(r: sa.Row[Any]) -> dict[str, Any]:
    """A batch as the grid shows it: the contract's fields, with long errors cut short."""
    row = batch_dict(r, None)
    del row["logs_fragment"]
    message = row["error_message"]
    if message and len(message) > GRID_ERROR_CHARS:
        row["error_message"] = message[:GRID_ERROR_CHARS] + "…"
        row["error_truncated"] = True
    return row


def _order(q: GridQuery, columns: Callable[[str], sa.ColumnElement[Any]]) -> list[sa.ColumnElement[Any]]:
    order: list[sa.ColumnElement[Any]] = []
    for col, direction in q.sort:
        column = columns(col)
        order.append(column.asc().nulls_first() if direction == "asc" else column.desc().nulls_last())
    order.append(columns("index").asc())
    return order


def batch_page(job: str, run: str, q: GridQuery) -> dict[str, Any]:
    """One page of a run's batches: ``rows``, ``lastRow`` and ``version`` (the run's
    :func:`~loader.contract.signature_token`, what ``/version`` answers).

    Sorting and filtering run in PostgreSQL with bound parameters. What a page costs at 100k batches:

    - the sort carries only the batch index and the sort columns (a few bytes a row, so it stays in
      ``work_mem`` where whole rows spilled to disk), then the page's rows are fetched by primary key;
    - ``lastRow`` is the number of rows matching the filters, as AG Grid's infinite model wants it. It
      is exact whenever the page reaches the end (one row more than the page is read to know); else it
      is counted only for the first page (``start == 0``), which the grid loads first after every sort
      or filter change and keeps the count of, and for a page past the end (a count gone stale); a
      later full page answers ``None``: "not the end", which AG Grid takes as "keep the count you
      have". Scrolling thus never counts the run again.

    Example::

        page = batch_page("orders", run_id, parse_query(0, 100, [{"colId": "index", "sort": "asc"}]))
    """
    conds = _where(q)
    size = q.end - q.start
    key = (batches.c.etl_job_id == job, batches.c.etl_run_id == run)
    sort_columns = {COLUMNS[col].name: COLUMNS[col] for col, _ in q.sort}
    sort_columns.pop(batches.c.batch_index.name, None)
    page = (sa.select(batches.c.batch_index, *sort_columns.values()).where(*key, *conds)
            .order_by(*_order(q, lambda col: COLUMNS[col])).offset(q.start).limit(size + 1).subquery("page"))
    select = (batch_rows_query(job, run).join_from(batches, page, batches.c.batch_index == page.c.batch_index)
              .order_by(*_order(q, lambda col: page.c[COLUMNS[col].name])))
    count = sa.select(sa.func.count()).select_from(batches).where(*key, *conds)
    with db.get_engine().connect() as conn:
        # First: the rows below are at least as new as the token, so the grid's poll of /version sees
        # any change that lands after it.
        token = signature_token(change_signature(job, run, conn))
        run_row = get_run_row(conn, job, run)
        found = conn.execute(select).all()
        total: int | None = None
        if len(found) <= size and (found or q.start == 0):
            total = q.start + len(found)  # the end is on this page
        elif q.start == 0 or not found:  # the first page, or past the end (the grid's count is stale)
            total = int(conn.execute(count).scalar_one())
    rows = [grid_row(r) for r in found[:size]]
    return {"rows": rows, "lastRow": total, "version": token, "status": run_row.status}


def batch_detail(job: str, run: str, index: int) -> dict[str, Any] | None:
    """One batch with its error stack, retry timeline (every attempt) and recent log events."""
    a = attempts.c
    e = events.c
    with db.get_engine().connect() as conn:
        row = conn.execute(batch_rows_query(job, run).add_columns(batches.c.error_stack)
                           .where(batches.c.batch_index == index)).first()
        if row is None:
            return None
        timeline = conn.execute(
            sa.select(a.attempt, a.status, a.trigger, a.worker, a.started_at, a.ended_at, a.duration_ms,
                      a.error_code, a.error_message, a.error_stack)
            .where(a.etl_job_id == job, a.etl_run_id == run, a.batch_index == index).order_by(a.attempt)).all()
        recent = conn.execute(
            sa.select(events).where(e.etl_job_id == job, e.etl_run_id == run, e.batch_index == index)
            .order_by(e.id.desc()).limit(DETAIL_EVENTS)).all()
    out = batch_dict(row, [event_dict(x) for x in reversed(recent)])
    out["error_stack"] = row.error_stack
    out["attempt_timeline"] = [
        {"attempt": t.attempt, "status": t.status, "trigger": t.trigger, "worker": t.worker,
         "started_at": iso(t.started_at), "ended_at": iso(t.ended_at),
         "duration_ms": round(t.duration_ms, 1) if t.duration_ms is not None else None,
         "error_code": t.error_code, "error_message": t.error_message, "error_stack": t.error_stack}
        for t in timeline]
    return out


def duration_series(job: str, run: str, limit: int = 1000) -> list[dict[str, Any]]:
    """Committed batches in commit order (at most ``limit``, evenly sampled): index, duration, rows/s."""
    b = batches.c
    ranked = (sa.select(b.batch_index, b.duration_ms, b.rows_attempted, b.committed_at,
                        sa.func.row_number().over(order_by=b.committed_at).label("n"),
                        sa.func.count().over().label("total"))
              .where(b.etl_job_id == job, b.etl_run_id == run, b.status == BatchStatus.SUCCEEDED.value,
                     b.committed_at.is_not(None)).subquery())
    step = sa.func.greatest(1, ranked.c.total / limit)
    q = sa.select(ranked).where((ranked.c.n - 1) % step == 0).order_by(ranked.c.n).limit(limit)
    with db.get_engine().connect() as conn:
        rows = conn.execute(q).all()
    return [{"batch": r.batch_index, "duration_ms": float(r.duration_ms or 0.0),
             "rows_per_s": round(r.rows_attempted / (r.duration_ms / 1000.0), 1) if r.duration_ms else 0.0,
             "committed_at": iso(r.committed_at)} for r in rows]
