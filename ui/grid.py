"""The batches grid: AG Grid's infinite row model paging through the app's JSON routes.

The rows never travel through Streamlit's script runs: the grid's datasource fetches pages of
``/etl/data-loader/api/runs/<job>/<run>/batches`` (sorted and filtered in SQL) and polls
``.../version`` every :data:`POLL_MS`, calling ``refreshInfiniteCache()`` when the run changed. Only the
selection, sort and filter model come back to Python (to show the batch detail and keep them in
the URL).

streamlit-aggrid needs ``allow_unsafe_jscode`` for a datasource (and forces it for a custom
return): it then evaluates every string of the options wrapped in its JS-code marker. Every piece
of JavaScript here is therefore a constant of this module; the values it needs (the run's API path,
the status filter) travel as data in AG Grid's ``context``; the sort and filter state comes rebuilt
by ``ui.grid_state``; and ``refuse_foreign_code`` checks the finished options for any marked string
before they leave (docs/console.md, "Why the grid's unsafe mode is safe").
"""

from __future__ import annotations

import copy
from typing import Any
from urllib.parse import quote

from st_aggrid import AgGrid, JsCode

from .grid_state import refuse_foreign_code
from .routes import API_PATH

#: Rows per page the grid asks for; blocks kept in the browser.
BLOCK_ROWS = 100
MAX_BLOCKS = 10
#: Milliseconds between two ``/version`` polls (one index-only ``change_signature`` statement each). A
#: changed row waits for the poll, then a page request and the grid's 200 ms block debounce: at 1 s its
#: lag was 2.2 s at p95 (BENCHMARKS.md, "Console: each panel's lag"), past the 2 s target.
POLL_MS = 500

#: Compact widths: at 1280 px every column fits without scrolling (headers wrap onto two lines, Error
#: takes the rest). Below that, Batch # and Status are pinned left (ON_SIZE) and the rest scrolls.
COLUMNS: list[dict[str, Any]] = [
    {"field": "index", "headerName": "Batch #", "filter": "agNumberColumnFilter", "width": 60, "pinned": "left"},
    {"field": "attempts", "headerName": "Attempt(s)", "filter": "agNumberColumnFilter", "width": 74,
     "headerTooltip": "Attempts made so far (1 = first try); retried(n) in Status is the same number"},
    {"field": "rows_attempted", "headerName": "Rows attempted", "filter": "agNumberColumnFilter", "width": 72},
    {"field": "rows_inserted", "headerName": "Inserted", "filter": "agNumberColumnFilter", "width": 72},
    {"field": "rows_updated", "headerName": "Updated", "filter": "agNumberColumnFilter", "width": 70},
    {"field": "validation_failures", "headerName": "Validation fails", "filter": "agNumberColumnFilter",
     "width": 72},
    {"field": "duration_ms", "headerName": "Duration", "filter": "agNumberColumnFilter", "width": 76,
     "valueFormatter": JsCode("function(p){ if (p.value == null) return '—'; return p.value < 1000"
                              " ? p.value.toFixed(1) + ' ms' : (p.value/1000).toFixed(2) + ' s'; }")},
    {"field": "status", "headerName": "Status", "filter": "agTextColumnFilter", "width": 100,
     "valueGetter": JsCode("function(p){ return p.data ? p.data.status_label : null; }"),
     "cellRenderer": JsCode("""class StatusCell {
        init(p) {
          const icons = {pending: '◌', running: '⟳', retried: '↻', succeeded: '✓', failed: '✕', canceled: '⊘'};
          const s = p.data ? p.data.status : null;
          this.e = document.createElement('span');
          this.e.className = 'dl-status dl-' + (s || 'none');
          this.e.textContent = s ? (icons[s] || '?') + ' ' + p.value : '';
          this.e.title = p.value || '';
        }
        getGui() { return this.e; }
        refresh() { return false; }
     }""")},
    {"field": "committed_at", "headerName": "Committed at", "sortable": True, "filter": False, "width": 92,
     "valueFormatter": JsCode("function(p){ if (!p.value) return '—'; const d = new Date(p.value);"
                              " const t = d.toLocaleTimeString([], {hour: '2-digit', minute: '2-digit',"
                              " second: '2-digit', hour12: false});"
                              " return d.toDateString() === new Date().toDateString() ? t"
                              " : d.toLocaleDateString([], {month: 'short', day: 'numeric'}) + ' ' + t; }"),
     "tooltipValueGetter": JsCode("function(p){ if (!p.value) return null; return new Date(p.value).toLocaleString()"
                                  " + ' (local); UTC: ' + p.value; }")},
    {"field": "error_message", "headerName": "Error", "filter": "agTextColumnFilter", "flex": 1, "minWidth": 80,
     "tooltipField": "error_message",
     "valueGetter": JsCode("function(p){ if (!p.data || !p.data.error_message) return null; return"
                           " (p.data.error_code ? '[' + p.data.error_code + '] ' : '') + p.data.error_message; }")},
]

#: Below this grid width (the ten columns' widths plus Error's minimum) Status is pinned next to Batch #.
FULL_WIDTH = sum(int(c.get("width", 0)) for c in COLUMNS) + 80

CSS = {
    ".dl-failed": {"color": "#b91c1c", "font-weight": "600"},
    ".dl-succeeded": {"color": "#166534"},
    ".dl-retried": {"color": "#9a3412"},
    ".dl-running": {"color": "#1e40af"},
    ".dl-canceled": {"color": "#475569", "font-style": "italic"},
    ".ag-cell-focus, .ag-header-cell:focus-visible, .ag-row-focus": {"outline": "2px solid #1d4ed8 !important"},
    ".ag-header-cell, .ag-cell": {"padding-left": "6px !important", "padding-right": "6px !important"},
    # Narrow headers wrap between words, never inside one ("Batc h #"), in the whole header cell: the
    # filter button floats over its top right corner, shown on hover, on keyboard focus and while the
    # column is filtered (AG Grid Community has no column menu: the button is the way to a filter).
    ".ag-header-cell-text": {"word-break": "normal !important", "overflow-wrap": "normal !important",
                             "white-space": "normal !important", "text-overflow": "clip !important",
                             "font-size": "12px", "line-height": "1.25"},
    ".ag-header-cell-comp-wrapper": {"position": "relative"},
    ".ag-header-cell-filter-button": {"position": "absolute", "right": "-4px", "top": "-2px", "opacity": "0",
                                      "background": "#ffffff", "border-radius": "3px", "z-index": "1"},
    ".ag-header-cell:hover .ag-header-cell-filter-button, .ag-header-cell:focus-within .ag-header-cell-filter-button,"
    " .ag-header-cell-filtered .ag-header-cell-filter-button, .ag-header-cell-filter-button:focus-visible":
        {"opacity": "1"},
    # The sideways scrollbar is always drawn (AG Grid hides overlay scrollbars until hovered).
    ".ag-body-horizontal-scroll.ag-scrollbar-invisible": {"opacity": "1 !important", "visibility": "visible !important",
                                                          "position": "relative !important",
                                                          "pointer-events": "auto !important"},
    ".ag-body-horizontal-scroll, .ag-body-horizontal-scroll-viewport, .ag-horizontal-left-spacer,"
    " .ag-horizontal-right-spacer": {"min-height": "14px !important", "height": "14px !important",
                                     "max-height": "14px !important"},
    ".ag-body-horizontal-scroll-viewport": {"overflow-x": "scroll !important", "scrollbar-width": "auto",
                                            "scrollbar-color": "#64748b #e2e8f0"},
}

# Constant code: the values come from the grid's context (built in grid_options), never from formatting.
_ON_READY = """function(params) {
  const api = params.api;
  const base = params.context.base;
  const statuses = params.context.statuses;
  let seen = null;
  let failed = false;  // a page could not be fetched (database down): refetch once the version answers
  // Pages being fetched. No refresh starts while one is: a refresh drops the answers still on their way,
  // so a run that changes every second would otherwise never show a page fetched in more than a second.
  let loading = 0;
  const datasource = {
    getRows: function(p) {
      const q = new URLSearchParams({start: p.startRow, end: p.endRow, sort: JSON.stringify(p.sortModel || []),
                                     filter: JSON.stringify(p.filterModel || {}), status: statuses});
      loading += 1;
      fetch(base + '/batches?' + q.toString(), {cache: 'no-store', credentials: 'same-origin'})
        .then(r => r.ok ? r.json() : Promise.reject(r.status))
        .then(d => { seen = d.version; p.successCallback(d.rows, d.lastRow);
                     if (d.lastRow === 0) { api.showNoRowsOverlay(); } else { api.hideOverlay(); } })
        .catch(() => { failed = true; p.failCallback(); })
        .finally(() => { loading -= 1; });
    }
  };
  api.setGridOption('datasource', datasource);
  // Tab and Shift+Tab leave the grid from any cell or header (arrow keys move inside it). The grid's
  // rows and headers are tabbable in AG Grid 34, so the browser alone would step through every row:
  // the focus goes to the page's next (previous) control after (before) the grid's frame instead.
  if (!window.dlTabOut && window.frameElement) {
    window.dlTabOut = true;
    document.addEventListener('keydown', function(e) {
      if (e.key !== 'Tab' || e.altKey || e.ctrlKey || e.metaKey) return;
      const t = e.target;
      if (!t.closest || !t.closest('.ag-root-wrapper') || t.closest('.ag-popup, .ag-filter, .ag-menu')) return;
      const frame = window.frameElement;
      const doc = frame.ownerDocument;
      const all = Array.from(doc.querySelectorAll(
        'a[href], button, input, select, textarea, iframe, summary, [tabindex]')).filter(function(el) {
          return el === frame || (el.tabIndex >= 0 && !el.disabled && el.getClientRects().length > 0
                                  && !el.closest('[inert], [aria-hidden="true"]'));
        });
      const i = all.indexOf(frame);
      const next = i < 0 ? null : all[e.shiftKey ? i - 1 : i + 1];
      e.preventDefault();
      e.stopPropagation();
      if (next) { next.focus(); } else { frame.blur(); }
    }, true);
  }
  const timer = setInterval(function() {
    if (api.isDestroyed && api.isDestroyed()) { clearInterval(timer); return; }
    if (loading > 0) return;  // the page on its way is at least as new as this version: let it land
    fetch(base + '/version', {cache: 'no-store', credentials: 'same-origin'})
      .then(r => r.ok ? r.json() : Promise.reject(r.status))
      .then(d => {
        if (failed || (seen !== null && d.version !== seen)) {
          failed = false; seen = d.version; api.refreshInfiniteCache();
        }
      })
      .catch(() => {});
  }, params.context.pollMs);
}"""

_RETURN = """function(r) {
  const api = r.eventData.api;
  const sel = api.getSelectedRows().map(x => x.index);
  const sort = api.getColumnState().filter(c => c.sort).map(c => ({colId: c.colId, sort: c.sort}));
  return {selected: sel, sort: sort, filter: api.getFilterModel()};
}"""


# Tab and Shift+Tab never step from cell to cell (AG Grid: returning false from tabToNextCell leaves Tab to
# the browser); the keydown listener of _ON_READY then moves the focus out of the grid's frame.
_TAB_OUT = "function(params) { return false; }"

# Batch # always pinned; Status pinned next to it when the grid is too narrow for every column.
_ON_SIZE = """function(params) {
  const narrow = params.clientWidth < params.context.fullWidth;
  const col = params.api.getColumn('status');
  const want = narrow ? 'left' : null;
  if (col && (col.getPinned() || null) !== want) {
    params.api.applyColumnState({state: [{colId: 'status', pinned: want}]});
  }
}"""

ON_READY = JsCode(_ON_READY)
TAB_OUT = JsCode(_TAB_OUT)
ON_SIZE = JsCode(_ON_SIZE)
ROW_ID = JsCode("function(p){ return String(p.data.index); }")
RETURN = JsCode(_RETURN)


def api_base(job: str, run: str) -> str:
    return f"{API_PATH}/{quote(job, safe='')}/{quote(run, safe='')}"


def grid_options(job: str, run: str, statuses: list[str], sort: list[dict[str, str]] | None = None,
                 filters: dict[str, Any] | None = None) -> dict[str, Any]:
    """AG Grid options for one run: infinite row model, stable row ids, single-row selection."""
    initial: dict[str, Any] = {}
    if sort:
        initial["sort"] = {"sortModel": sort}
    if filters:
        initial["filter"] = {"filterModel": filters}
    return {
        # A copy: streamlit-aggrid replaces the JsCode objects of the options it is given by marked
        # strings, in place; the module's constants must stay objects for refuse_foreign_code.
        "columnDefs": copy.deepcopy(COLUMNS),
        "defaultColDef": {"sortable": True, "resizable": True, "wrapHeaderText": True, "autoHeaderHeight": True,
                          "filterParams": {"maxNumConditions": 1, "buttons": ["reset", "apply"]}},
        "rowModelType": "infinite",
        "cacheBlockSize": BLOCK_ROWS,
        "maxBlocksInCache": MAX_BLOCKS,
        "infiniteInitialRowCount": 1,
        "maxConcurrentDatasourceRequests": 2,
        # Measured in bench/console.py at 100k batches: without these, a fast scroll fetched ~100
        # pages and produced 100-250 ms main-thread tasks; with them, none over 100 ms.
        "blockLoadDebounceMillis": 200,
        "debounceVerticalScrollbar": True,
        "animateRows": False,
        # Fewer off-screen rows drawn per scroll step (default 10): worst slow-scroll task 60 ms vs 97 ms.
        "rowBuffer": 2,
        "getRowId": ROW_ID,
        "rowSelection": {"mode": "singleRow", "checkboxes": False, "enableClickSelection": True},
        "tooltipShowDelay": 300,
        "ensureDomOrder": True,
        "overlayNoRowsTemplate": "<span>No batches match.</span>",
        "overlayLoadingTemplate": "<span>Loading batches…</span>",
        "initialState": initial,
        "context": {"base": api_base(job, run), "statuses": ",".join(statuses), "pollMs": POLL_MS,
                    "fullWidth": FULL_WIDTH},
        "onGridReady": ON_READY,
        "onGridSizeChanged": ON_SIZE,
        "tabToNextCell": TAB_OUT,
    }


def batches_grid(job: str, run: str, statuses: list[str], sort: list[dict[str, str]] | None,
                 filters: dict[str, Any] | None, key: str) -> dict[str, Any]:
    """Render the grid; returns ``{"selected": [index], "sort": [...], "filter": {...}}`` (empty at first)."""
    options = grid_options(job, run, statuses, sort, filters)
    refuse_foreign_code(options)
    response = AgGrid(
        None,
        gridOptions=options,
        height=440,
        allow_unsafe_jscode=True,
        data_return_mode="CUSTOM",
        custom_jscode_for_grid_return=RETURN,
        update_on=["selectionChanged", "sortChanged", "filterChanged"],
        key=key,
        theme="streamlit",
        custom_css=CSS,
        show_toolbar=False,
        show_search=False,
        show_download_button=False,
    )
    raw = getattr(response, "raw_data", None)
    return raw if isinstance(raw, dict) else {}
