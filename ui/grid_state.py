"""The batches grid's state from outside (a URL, the grid's own report): rebuilt field by field.

streamlit-aggrid evaluates, with ``new Function``, every string of the grid options that holds its
JS-code marker (``::JSCODE::``), and the sort and filter state read from a link go into those
options (``initialState``). So nothing read from outside is passed on as it came: each part is
rebuilt from an allow-list (known column ids, known filter types and operators, plain numbers and
short plain strings), a string holding the marker is refused wherever it stands, and whatever is
dropped is named in a note the page shows. The SQL side checks the same models again
(``ui.grid_query.parse_query`` and the engine's ``loader.browse.BatchQuery``, which also decides which
operators each column type knows).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from loader.browse import COLUMNS, MAX_NUMBER, MAX_TEXT, NUMBER_COLUMNS, STATUSES
from loader.errors import ConfigError

from .grid_query import parse_json_param, parse_query

#: streamlit-aggrid's marker around JavaScript to evaluate (st_aggrid.shared.JsCode).
JS_CODE_MARKER = "::JSCODE::"
_MARKER_RE = re.compile(re.escape(JS_CODE_MARKER), re.IGNORECASE)
#: Longest text a filter may hold (as the engine allows); an operator name is a short word.
MAX_FILTER_TEXT = MAX_TEXT
_WORD = re.compile(r"^[A-Za-z]{1,32}$")
#: Conditions a combined filter may hold (AG Grid's default; our grid offers one).
MAX_CONDITIONS = 2
#: The grid's columns (ui/grid.py COLUMNS, in its order): each can be sorted; all but committed_at filtered.
#: error_code is shown inside the Error column, not as a column of its own.
SORTABLE = tuple(c for c in COLUMNS if c != "error_code")


class ForeignCode(ValueError):
    """A string from outside holds the JS-code marker: it must never reach the grid."""


def has_js_code_marker(value: object) -> bool:
    """True when ``value`` (a string) holds streamlit-aggrid's JS-code marker, in any letter case.

    Example::

        >>> has_js_code_marker("::JSCODE::alert(1)::JSCODE::")
        True
    """
    return isinstance(value, str) and _MARKER_RE.search(value) is not None


def plain_text(value: object, max_chars: int = MAX_FILTER_TEXT) -> str | None:
    """``value`` when it is a string of at most ``max_chars`` without NUL or the JS-code marker, else None."""
    if not isinstance(value, str) or len(value) > max_chars or "\x00" in value or has_js_code_marker(value):
        return None
    return value


def plain_number(value: object) -> int | float | None:
    """``value`` when it is a finite JSON number within the ledger's integer range, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if abs(value) <= MAX_NUMBER else None


@dataclass(frozen=True)
class GridState:
    """Status filter, sort model and filter model, each rebuilt from the allow-list.

    ``notes`` says what was dropped, in words the page can show (never the dropped text itself).
    """

    statuses: list[str] = field(default_factory=list)
    sort: list[dict[str, str]] = field(default_factory=list)
    filters: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def read_grid_state(status: str | None, sort: str | None, filters: str | None) -> GridState:
    """The grid state of a link's ``status``, ``sort`` and ``filter`` query parameters.

    Example::

        >>> s = read_grid_state("failed,bogus", '[{"colId": "index", "sort": "desc"}]', None)
        >>> s.statuses, s.sort, s.notes
        (['failed'], [{'colId': 'index', 'sort': 'desc'}], ["The link's status filter ..."])
    """
    notes: list[str] = []
    statuses = rebuild_statuses(status, notes)
    try:
        sort_model: Any = parse_json_param("sort", sort)
    except ConfigError:
        sort_model = None
        notes.append("The link's sort was dropped: it is not a JSON list of {colId, sort}.")
    try:
        filter_model: Any = parse_json_param("filter", filters)
    except ConfigError:
        filter_model = None
        notes.append("The link's filter was dropped: it is not a JSON object of column filters.")
    kept_sort = rebuild_sort(sort_model, notes, "The link's sort")
    kept_filters = rebuild_filters(filter_model, notes, "The link's filter")
    return GridState(statuses, kept_sort, kept_filters, notes)


def rebuild_statuses(raw: str | None, notes: list[str]) -> list[str]:
    """Known batch statuses of a comma-separated list, in the grid's order."""
    wanted = [s for s in (raw or "").split(",") if s]
    kept = [s for s in STATUSES if s in wanted]
    if len(kept) != len(set(wanted)):
        notes.append(f"The link's status filter held something else than {', '.join(STATUSES)}: that part "
                     "was dropped.")
    return kept


def rebuild_sort(model: Any, notes: list[str], what: str = "The sort") -> list[dict[str, str]]:
    """A new sort model holding only ``{colId, sort}`` pairs of known columns and directions."""
    if model is None or model == []:
        return []
    if not isinstance(model, list):
        notes.append(f"{what} was dropped: it is not a list of {{colId, sort}}.")
        return []
    kept: list[dict[str, str]] = []
    dropped = 0
    for item in model[: len(SORTABLE)]:
        ok = (isinstance(item, dict) and set(item) <= {"colId", "sort", "sortIndex"}
              and item.get("colId") in SORTABLE and item.get("sort") in ("asc", "desc")
              and all(k["colId"] != item["colId"] for k in kept))
        if ok:
            kept.append({"colId": str(item["colId"]), "sort": str(item["sort"])})
        else:
            dropped += 1
    dropped += max(0, len(model) - len(SORTABLE))
    if dropped:
        notes.append(f"{what} named {dropped} column(s) or direction(s) the grid does not have: "
                     "that part was dropped.")
    return kept


def rebuild_filters(model: Any, notes: list[str], what: str = "The filter") -> dict[str, Any]:
    """A new filter model: known columns, known filter types and operators, plain values.

    Each column's filter is rebuilt from its parts; a part that is unknown, of the wrong type, too
    long or holding the JS-code marker drops that column's filter (never the page).
    """
    if model is None or model == {}:
        return {}
    if not isinstance(model, dict):
        notes.append(f"{what} was dropped: it is not an object of column filters.")
        return {}
    kept: dict[str, Any] = {}
    for col, spec in list(model.items())[: len(SORTABLE)]:
        rebuilt = _column_filter(col, spec)
        if rebuilt is None:
            name = f"column {col!r}" if col in SORTABLE else "a column the grid does not have"
            notes.append(f"{what} on {name} was dropped: only the grid's own filter types and plain "
                         f"values (numbers, text of at most {MAX_FILTER_TEXT} characters) are kept.")
            continue
        kept[col] = rebuilt
    if len(model) > len(SORTABLE):
        notes.append(f"{what} named more columns than the grid has: the rest was dropped.")
    return kept


def _column_filter(col: object, spec: Any) -> dict[str, Any] | None:
    if not isinstance(col, str) or col not in SORTABLE or col == "committed_at" or not isinstance(spec, dict):
        return None
    kind = "number" if col in NUMBER_COLUMNS else "text"
    if spec.get("filterType", kind) != kind:
        return None
    if "conditions" in spec:
        conditions = spec["conditions"]
        operator = spec.get("operator", "AND")
        if (set(spec) - {"filterType", "operator", "conditions"} or operator not in ("AND", "OR")
                or not isinstance(conditions, list) or not 1 <= len(conditions) <= MAX_CONDITIONS):
            return None
        parts = [_condition(kind, c) for c in conditions]
        if any(p is None for p in parts):
            return None
        rebuilt: dict[str, Any] = {"filterType": kind, "operator": operator, "conditions": parts}
    else:
        one = _condition(kind, spec)
        if one is None:
            return None
        rebuilt = one
    try:  # the engine's own check: the operator exists for this column type, the value fits
        parse_query(filters={col: rebuilt})
    except ConfigError:
        return None
    return rebuilt


def _condition(kind: str, spec: Any) -> dict[str, Any] | None:
    """One condition ``{filterType, type, filter[, filterTo]}`` built anew, or None."""
    if not isinstance(spec, dict) or set(spec) - {"filterType", "type", "filter", "filterTo"}:
        return None
    if spec.get("filterType", kind) != kind:
        return None
    op = spec.get("type")
    if not isinstance(op, str) or not _WORD.match(op):
        return None
    out: dict[str, Any] = {"filterType": kind, "type": op}
    if op in ("blank", "notBlank"):
        return out if "filter" not in spec and "filterTo" not in spec else None
    value = plain_number(spec.get("filter")) if kind == "number" else plain_text(spec.get("filter"))
    if value is None:
        return None
    out["filter"] = value
    if "filterTo" in spec:
        upper = plain_number(spec["filterTo"]) if kind == "number" else None
        if upper is None:
            return None
        out["filterTo"] = upper
    return out


def refuse_foreign_code(value: Any, path: str = "gridOptions") -> None:
    """Raise ForeignCode when any string (key or value) inside ``value`` holds the JS-code marker.

    The last check before options reach streamlit-aggrid: the console's own JavaScript is held in
    ``st_aggrid.JsCode`` objects (not strings) until the component serializes them, so a marked
    string found here came from outside.
    """
    if isinstance(value, str):
        if has_js_code_marker(value):
            raise ForeignCode(f"{path} holds text with the JS-code marker; refusing to draw the grid")
    elif isinstance(value, dict):
        for key, item in value.items():
            refuse_foreign_code(key, path)
            refuse_foreign_code(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            refuse_foreign_code(item, f"{path}[{i}]")


def url_value(model: list[Any] | dict[str, Any]) -> str:
    """A sort or filter model as the compact JSON kept in the URL."""
    return json.dumps(model, separators=(",", ":"))
