"""The grid's state from outside is rebuilt from the allow-list, and no marked string reaches the grid."""

from __future__ import annotations

import json

import pytest
from st_aggrid import JsCode
from st_aggrid.shared import walk_gridOptions

from ui.grid import COLUMNS, FULL_WIDTH, POLL_MS, grid_options
from ui.grid_state import (
    SORTABLE,
    ForeignCode,
    read_grid_state,
    rebuild_filters,
    refuse_foreign_code,
)

JSC = "::JSCODE::(window.__xss=3)::JSCODE::"
NUMBER = {"filterType": "number", "type": "equals", "filter": 1}
TEXT = {"filterType": "text", "type": "contains", "filter": "timeout"}


def test_the_allow_list_names_exactly_the_grids_columns():
    assert set(SORTABLE) == {c["field"] for c in COLUMNS}


def test_filters_and_sorts_the_grid_can_hold_are_kept_as_they_are():
    filters = {"index": {**NUMBER, "type": "inRange", "filterTo": 9}, "error_message": TEXT,
               "rows_attempted": {"filterType": "number", "operator": "OR", "conditions": [NUMBER, NUMBER]},
               "status": {"filterType": "text", "type": "blank"}}
    sort = [{"colId": "duration_ms", "sort": "desc"}, {"colId": "committed_at", "sort": "asc"}]
    state = read_grid_state("failed,retried", json.dumps(sort), json.dumps(filters))
    assert state.statuses == ["retried", "failed"]
    assert state.sort == sort
    assert state.filters == filters
    assert state.notes == []


def test_a_filter_without_filter_type_gets_its_columns_type():
    state = read_grid_state(None, None, json.dumps({"index": {"type": "equals", "filter": 3}}))
    assert state.filters == {"index": {"filterType": "number", "type": "equals", "filter": 3}}


@pytest.mark.parametrize("model", [
    {JSC: TEXT},
    {"error_message": {**TEXT, "filter": JSC}},
    {"error_message": {**TEXT, "filter": "x" + JSC.lower()}},
    {"error_message": {**TEXT, "filterType": JSC}},
    {"error_message": {**TEXT, "type": JSC}},
    {"error_message": {**TEXT, "extra": JSC}},
    {"error_message": {**TEXT, "extra": "harmless"}},
    {"index": {**NUMBER, "filterTo": JSC}},
    {"index": {**NUMBER, "filter": "1"}},
    {"index": {**NUMBER, "filter": True}},
    {"index": {**NUMBER, "filter": 2**40}},
    {"index": {**NUMBER, "filterType": "text"}},
    {"index": {"filterType": "number", "operator": JSC, "conditions": [NUMBER]}},
    {"index": {"filterType": "number", "operator": "AND", "conditions": [NUMBER, NUMBER, NUMBER]}},
    {"index": {"filterType": "number", "operator": "AND", "conditions": [{**NUMBER, "x": JSC}]}},
    {"index": {"filterType": "number", "operator": "AND", "conditions": [NUMBER], "x": JSC}},
    {"status": {"filterType": "text", "type": "blank", "filter": JSC}},
    {"committed_at": TEXT},
    {"error_code": TEXT},
    {"error_message": {**TEXT, "filter": "a" * 201}},
    {"error_message": {**TEXT, "filter": "a\x00b"}},
])
def test_a_filter_with_anything_unknown_or_marked_is_dropped_with_a_note(model):
    notes: list[str] = []
    assert rebuild_filters(model, notes, "The link's filter") == {}
    assert len(notes) == 1 and notes[0].startswith("The link's filter")
    assert JSC not in notes[0]


@pytest.mark.parametrize("sort", [
    [{"colId": JSC, "sort": "asc"}], [{"colId": "index", "sort": JSC}], [{"colId": "index", "sort": "asc", "x": JSC}],
    [{"colId": "error_code", "sort": "asc"}], {"colId": "index", "sort": "asc"}, "index",
])
def test_a_sort_with_anything_unknown_or_marked_is_dropped_with_a_note(sort):
    state = read_grid_state(None, json.dumps(sort), None)
    assert state.sort == [] and state.notes and state.notes[0].startswith("The link's sort")


def test_unknown_statuses_are_dropped_with_a_note():
    state = read_grid_state(f"failed,{JSC},running", None, None)
    assert state.statuses == ["running", "failed"] and len(state.notes) == 1


@pytest.mark.parametrize("where", ["value", "key", "nested"])
def test_a_marked_string_anywhere_in_the_options_is_refused(where):
    options = grid_options("job", "run", ["failed"])
    if where == "value":
        options["overlayNoRowsTemplate"] = JSC
    elif where == "key":
        options["context"][JSC] = 1
    else:
        options["initialState"] = {"filter": {"filterModel": {"error_message": {**TEXT, "filter": JSC}}}}
    with pytest.raises(ForeignCode):
        refuse_foreign_code(options)


def test_the_console_options_hold_code_only_as_constants_and_survive_the_components_rewrite():
    first = grid_options("job", "run", ["failed"], [{"colId": "index", "sort": "asc"}], {"error_message": TEXT})
    refuse_foreign_code(first)
    # streamlit-aggrid turns JsCode objects into marked strings in the options it is given, in place.
    walk_gridOptions(first, lambda v: v.js_code if isinstance(v, JsCode) else v)
    again = grid_options("job", "run", ["failed"])
    refuse_foreign_code(again)
    assert isinstance(COLUMNS[6]["valueFormatter"], JsCode)
    assert again["context"] == {"base": "/etl/data-loader/api/runs/job/run", "statuses": "failed", "pollMs": POLL_MS,
                                "fullWidth": FULL_WIDTH}
