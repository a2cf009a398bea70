"""AG Grid's sort and filter models translated into the engine's batch queries (loader.browse), and back.

The batches grid (ui/grid.py) pages through ``…/batches`` with AG Grid's infinite row model: its sort
model (``[{colId, sort}]``), filter model (``{colId: {filterType, type, filter, filterTo}}`` or a
combined ``{operator, conditions}``), and the answer it wants (``rows``, ``lastRow``). This module is
the one place that speaks that dialect to the engine: :func:`parse_query` checks a request and builds a
:class:`loader.browse.BatchQuery`, :func:`page_json` turns a :class:`loader.browse.BatchPage` into the
grid's answer. ui/grid_state.py rebuilds the same models from a URL before they reach the grid.
"""

from __future__ import annotations

import json
from typing import Any

from loader.browse import (
    COLUMNS,
    FILTERABLE,
    AllOf,
    AnyOf,
    BatchPage,
    BatchQuery,
    Condition,
    Sort,
    Term,
)
from loader.errors import ConfigError

#: AG Grid's filter types (the ``type`` of a condition) -> the engine's operators. A type the column's
#: kind lacks (``inRange`` on text, ``contains`` on a number) is refused by the engine.
AG_OPS = {
    "equals": "eq",
    "notEqual": "ne",
    "lessThan": "lt",
    "lessThanOrEqual": "le",
    "greaterThan": "gt",
    "greaterThanOrEqual": "ge",
    "inRange": "between",
    "contains": "contains",
    "notContains": "not_contains",
    "startsWith": "starts_with",
    "endsWith": "ends_with",
    "blank": "blank",
    "notBlank": "not_blank",
}
#: Conditions of a combined filter the engine is given (AG Grid's default; our grid offers one).
MAX_CONDITIONS = 2
#: Longest sort or filter JSON accepted from a URL.
MAX_JSON_CHARS = 4000


def parse_query(start: Any = 0, end: Any = 100, sort: Any = None, filters: Any = None,
                statuses: Any = None) -> BatchQuery:
    """A grid page request as a BatchQuery; ConfigError says what is wrong (the route answers 400).

    ``sort`` and ``filters`` are AG Grid's sort and filter models (parsed JSON), ``statuses`` a
    comma-separated text or a list.

    Example::

        >>> parse_query(0, 50, [{"colId": "duration_ms", "sort": "desc"}]).sort
        (Sort(column='duration_ms', descending=True),)
    """
    try:
        first, last = int(start), int(end)
    except (TypeError, ValueError):
        raise ConfigError(f"start and end must be whole numbers, found {start!r} and {end!r}"[:300]) from None
    order: list[Sort] = []
    if sort is not None and not isinstance(sort, list):
        raise ConfigError("the sort model must be a list of {colId, sort}")
    for item in sort or []:
        if not isinstance(item, dict) or not isinstance(item.get("colId"), str) or item["colId"] not in COLUMNS \
                or item.get("sort") not in ("asc", "desc"):
            raise ConfigError(f"cannot sort by {item!r}: sortable columns are {', '.join(COLUMNS)}"[:300])
        order.append(Sort(item["colId"], descending=item["sort"] == "desc"))
    where: list[Term] = []
    if filters:
        if not isinstance(filters, dict):
            raise ConfigError("the filter model must be an object")
        for col, spec in filters.items():
            where.append(_term(col, spec))
    wanted: tuple[str, ...] = ()
    if statuses:
        wanted = tuple(s for s in (statuses.split(",") if isinstance(statuses, str) else statuses) if s)
    return BatchQuery(first, last, tuple(order), tuple(where), wanted)


def _term(col: Any, spec: Any) -> Term:
    """One column's filter (a condition, or AG Grid's combined ``{operator: AND|OR, conditions}``)."""
    if not isinstance(col, str) or col not in FILTERABLE:
        raise ConfigError(f"cannot filter on {col!r}: filterable columns are {', '.join(FILTERABLE)}"[:300])
    if not isinstance(spec, dict):
        raise ConfigError(f"filter on {col!r} must be an object")
    if "conditions" in spec:
        if not isinstance(spec["conditions"], list):
            raise ConfigError(f"filter on {col!r}: conditions must be a list")
        parts = tuple(_term(col, c) for c in spec["conditions"][:MAX_CONDITIONS])
        if not parts:
            raise ConfigError(f"filter on {col!r} has no conditions")
        return AllOf(parts) if spec.get("operator", "AND") == "AND" else AnyOf(parts)
    kind = spec.get("type")
    if not isinstance(kind, str):
        raise ConfigError(f"filter on {col!r}: type must be a text, found {kind!r}"[:300])
    op = AG_OPS.get(kind)
    if op is None:
        raise ConfigError(f"filter on {col!r}: type must be one of {', '.join(AG_OPS)}")
    if op in ("blank", "not_blank"):
        return Condition(col, op)
    return Condition(col, op, spec.get("filter"), spec.get("filterTo") if op == "between" else None)


def page_json(page: BatchPage) -> dict[str, Any]:
    """A page as AG Grid's infinite row model wants it: ``rows`` and ``lastRow`` (None: "not the end,
    keep the count you have"), with the run's ``version`` token and ``status``."""
    return {"rows": page.rows, "lastRow": page.total, "version": page.version, "status": page.status}


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
