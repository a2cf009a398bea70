"""One run's batches for people, read in PostgreSQL: pages (sorted, filtered), a batch's detail, durations.

The terms are the engine's own: a :class:`BatchQuery` of :class:`Sort` keys and conditions (:class:`Condition`,
grouped with :class:`AllOf` / :class:`AnyOf`) on the batch fields of the run contract. The console's
grid speaks AG Grid's filter model and translates it in ``ui/grid_query.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

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

#: Largest page one query may ask for.
MAX_PAGE_ROWS = 500
#: Largest row number a page may end at (far beyond any run; keeps OFFSET within bigint).
MAX_ROW = 10**12
#: Largest absolute value a number condition may hold: PostgreSQL's integer (NaN and infinities fail too).
MAX_NUMBER = 2**31 - 1
#: Longest text a text condition may hold.
MAX_TEXT = 200
#: Longest error message sent in a page's row; the full text is in the batch detail.
ROW_ERROR_CHARS = 240
#: Log events shown in a batch's detail.
DETAIL_EVENTS = 50

#: Batch field (as the run contract names it) -> ledger column. Only these can be sorted or filtered.
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
#: Columns a condition may test (every one but committed_at).
FILTERABLE = tuple(c for c in COLUMNS if c != "committed_at")
STATUSES = tuple(s.value for s in BatchStatus)

_Op = Callable[[sa.ColumnElement[Any], Any], sa.ColumnElement[bool]]

#: Operators of a number column; ``between`` takes ``value`` and ``upper`` (both included).
NUMBER_OPS: dict[str, _Op] = {
    "eq": lambda c, v: c == v,
    "ne": lambda c, v: c != v,
    "lt": lambda c, v: c < v,
    "le": lambda c, v: c <= v,
    "gt": lambda c, v: c > v,
    "ge": lambda c, v: c >= v,
}
#: Operators of a text column: case-insensitive; a negation keeps the rows where the column is NULL.
TEXT_OPS: dict[str, _Op] = {
    "contains": lambda c, v: c.icontains(v, autoescape=True),
    "not_contains": lambda c, v: sa.or_(c.is_(None), sa.not_(c.icontains(v, autoescape=True))),
    "eq": lambda c, v: sa.func.lower(c) == v.lower(),
    "ne": lambda c, v: sa.or_(c.is_(None), sa.func.lower(c) != v.lower()),
    "starts_with": lambda c, v: c.istartswith(v, autoescape=True),
    "ends_with": lambda c, v: c.iendswith(v, autoescape=True),
}
#: Operators of any filterable column, taking no value.
BLANK_OPS = ("blank", "not_blank")


@dataclass(frozen=True)
class Sort:
    """One sort key: a column of :data:`COLUMNS`, ascending (NULLs first) or descending (NULLs last)."""

    column: str
    descending: bool = False


@dataclass(frozen=True)
class Condition:
    """``column op value``: e.g. ``Condition("duration_ms", "between", 10, 500)``,
    ``Condition("error_message", "contains", "timeout")``, ``Condition("error_code", "blank")``.

    The operator must exist for the column's type (:data:`NUMBER_OPS` plus ``between``,
    :data:`TEXT_OPS`, :data:`BLANK_OPS`); numbers are within ±MAX_NUMBER, texts at most MAX_TEXT
    characters without NUL. ConfigError says what is wrong.
    """

    column: str
    op: str
    value: int | float | str | None = None
    upper: int | float | None = None

    def __post_init__(self) -> None:
        _check_condition(self)


@dataclass(frozen=True)
class AllOf:
    """Every term holds."""

    terms: tuple[Term, ...]


@dataclass(frozen=True)
class AnyOf:
    """At least one term holds."""

    terms: tuple[Term, ...]


Term: TypeAlias = "Condition | AllOf | AnyOf"


@dataclass(frozen=True)
class BatchQuery:
    """One page request: rows ``start`` (inclusive) to ``end`` (exclusive) of the batches that meet
    every term of ``where`` and, when ``statuses`` is given, are in one of those states, in ``sort``
    order (then by index). Checked when built: ConfigError says what is wrong.

    Example::

        BatchQuery(0, 100, sort=(Sort("duration_ms", descending=True),),
                   where=(Condition("attempts", "gt", 1),), statuses=("failed",))
    """

    start: int = 0
    end: int = 100
    sort: tuple[Sort, ...] = ()
    where: tuple[Term, ...] = ()
    statuses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        first, last = self.start, self.end
        if first < 0 or last <= first or last - first > MAX_PAGE_ROWS or last > MAX_ROW:
            raise ConfigError(f"rows {first}..{last}: need 0 <= start < end <= {MAX_ROW} and at most "
                              f"{MAX_PAGE_ROWS} rows")
        for key in self.sort:
            if key.column not in COLUMNS:
                raise ConfigError(f"cannot sort by {key.column!r}: sortable columns are {', '.join(COLUMNS)}"[:300])
        for term in self.where:
            _check_term(term)
        bad = [s for s in self.statuses if s not in STATUSES]
        if bad:
            raise ConfigError(f"unknown batch status {bad[0]!r}: expected one of {', '.join(STATUSES)}"[:300])


@dataclass(frozen=True)
class BatchPage:
    """One page of batches: ``rows`` (the contract's batch fields, long errors cut short), ``total``
    (how many batches match, or None when not counted: see :func:`batch_page`), ``version`` (the run's
    :func:`~loader.contract.signature_token`) and the run's ``status``."""

    rows: list[dict[str, Any]]
    total: int | None
    version: str
    status: str


def _is_number(value: object) -> bool:
    """A number the ledger's columns (PostgreSQL integer, double) can be compared with."""
    return isinstance(value, int | float) and not isinstance(value, bool) and abs(value) <= MAX_NUMBER


def _check_condition(c: Condition) -> None:
    col, op = c.column, c.op
    if col not in FILTERABLE:
        raise ConfigError(f"cannot filter on {col!r}: filterable columns are {', '.join(FILTERABLE)}"[:300])
    if op in BLANK_OPS:
        return
    if col in TEXT_COLUMNS:
        value = c.value
        if op not in TEXT_OPS or not isinstance(value, str) or len(value) > MAX_TEXT or "\x00" in value:
            raise ConfigError(f"text filter on {col!r}: the operator must be one of {', '.join(TEXT_OPS)} "
                              f"with a text of at most {MAX_TEXT} characters (and no NUL)")
        return
    if not _is_number(c.value):
        raise ConfigError(f"number filter on {col!r} needs a number within ±{MAX_NUMBER}, found {c.value!r}"[:300])
    if op == "between":
        if not _is_number(c.upper):
            raise ConfigError(f"range filter on {col!r} needs an upper bound within ±{MAX_NUMBER}, "
                              f"found {c.upper!r}"[:300])
        return
    if op not in NUMBER_OPS:
        raise ConfigError(f"number filter on {col!r}: the operator must be one of between, {', '.join(NUMBER_OPS)}")


def _check_term(term: object) -> None:
    if isinstance(term, AllOf | AnyOf):
        if not term.terms:
            raise ConfigError("a group of conditions is empty")
        for t in term.terms:
            _check_term(t)
    elif not isinstance(term, Condition):
        raise ConfigError(f"not a condition: {type(term).__name__}")


def _clause(term: Term) -> sa.ColumnElement[bool]:
    if isinstance(term, AllOf):
        return sa.and_(*(_clause(t) for t in term.terms))
    if isinstance(term, AnyOf):
        return sa.or_(*(_clause(t) for t in term.terms))
    column = COLUMNS[term.column]
    if term.op == "blank":
        return column.is_(None)
    if term.op == "not_blank":
        return column.is_not(None)
    if term.column in TEXT_COLUMNS:
        return TEXT_OPS[term.op](column, term.value)
    if term.op == "between":
        return sa.and_(column >= term.value, column <= term.upper)
    return NUMBER_OPS[term.op](column, term.value)


def _where(q: BatchQuery) -> list[sa.ColumnElement[bool]]:
    conds = [_clause(term) for term in q.where]
    if q.statuses:
        conds.append(batches.c.status.in_(q.statuses))
    return conds


def page_row(r: sa.Row[Any]) -> dict[str, Any]:
    """A batch as a page shows it: the contract's fields, with long errors cut short."""
    row = batch_dict(r, None)
    del row["logs_fragment"]
    message = row["error_message"]
    if message and len(message) > ROW_ERROR_CHARS:
        row["error_message"] = message[:ROW_ERROR_CHARS] + "…"
        row["error_truncated"] = True
    return row


def _order(q: BatchQuery, columns: Callable[[str], sa.ColumnElement[Any]]) -> list[sa.ColumnElement[Any]]:
    order: list[sa.ColumnElement[Any]] = []
    for key in q.sort:
        column = columns(key.column)
        order.append(column.desc().nulls_last() if key.descending else column.asc().nulls_first())
    order.append(columns("index").asc())
    return order


def batch_page(job: str, run: str, q: BatchQuery) -> BatchPage:
    """One page of a run's batches, with ``total`` and ``version`` (the run's
    :func:`~loader.contract.signature_token`, what the console's ``/version`` answers).

    Sorting and filtering run in PostgreSQL with bound parameters. What a page costs at 100k batches:

    - the sort carries only the batch index and the sort columns (a few bytes a row, so it stays in
      ``work_mem`` where whole rows spilled to disk), then the page's rows are fetched by primary key,
      in a statement of their own (whatever the statistics of a run planned moments ago say);
    - ``total`` is the number of batches matching the query. It is exact whenever the page reaches
      the end (one row more than the page is read to know); else it is counted only for the first page
      (``start == 0``), which a scrolling reader (the console's grid) loads first after every sort or
      query change and keeps the count of, and for a page past the end (a count gone stale); a later
      full page answers ``None``: "not the end, keep the count you have". Scrolling thus never counts
      the run again.

    Example::

        page = batch_page("orders", run_id, BatchQuery(0, 100, sort=(Sort("duration_ms", descending=True),)))
        page.rows[0]["index"], page.total
    """
    conds = _where(q)
    size = q.end - q.start
    key = (batches.c.etl_job_id == job, batches.c.etl_run_id == run)
    page = (sa.select(batches.c.batch_index).where(*key, *conds)
            .order_by(*_order(q, lambda col: COLUMNS[col])).offset(q.start).limit(size + 1))
    count = sa.select(sa.func.count()).select_from(batches).where(*key, *conds)
    with db.get_engine().connect() as conn:
        # First: the rows below are at least as new as the token, so a reader polling the version sees
        # any change that lands after it.
        token = signature_token(change_signature(job, run, conn))
        run_row = get_run_row(conn, job, run)
        # The page's indexes, then their rows by primary key: as one join, a run planned moments ago
        # (its statistics still say "1 row") got a plan that ran the page once per batch (25 s at 100k).
        indexes = list(conn.execute(page).scalars())
        rows = {r.batch_index: r for r in conn.execute(
            batch_rows_query(job, run).where(batches.c.batch_index.in_(indexes)))} if indexes else {}
        found = [rows[i] for i in indexes if i in rows]
        total: int | None = None
        if len(found) <= size and (found or q.start == 0):
            total = q.start + len(found)  # the end is on this page
        elif q.start == 0 or not found:  # the first page, or past the end (the grid's count is stale)
            total = int(conn.execute(count).scalar_one())
    return BatchPage([page_row(r) for r in found[:size]], total, token, run_row.status)


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
