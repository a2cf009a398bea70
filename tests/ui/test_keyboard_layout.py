"""The batches grid's layout at each width and its keyboard behaviour, in headless Chromium."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.usefixtures("ledger")]

GRID = "iframe[title='st_aggrid.AgGrid.agGrid']"
COLUMN_IDS = ["index", "attempts", "rows_attempted", "rows_inserted", "rows_updated", "validation_failures",
              "duration_ms", "status", "committed_at", "error_message"]

#: In the grid's frame: each header's box, the grid's own box, and the sideways scroll state.
LAYOUT = """() => {
  const root = document.querySelector('.ag-root-wrapper').getBoundingClientRect();
  const heads = {};
  for (const h of document.querySelectorAll('.ag-header-cell[col-id]')) {
    const b = h.getBoundingClientRect();
    heads[h.getAttribute('col-id')] = {left: b.left, right: b.right, width: b.width,
                                        pinned: !!h.closest('.ag-pinned-left-header')};
  }
  const v = document.querySelector('.ag-body-horizontal-scroll-viewport');
  const bar = document.querySelector('.ag-body-horizontal-scroll');
  const cs = getComputedStyle(bar);
  return {root: {left: root.left, right: root.right}, heads: heads,
          scroll: {scrollWidth: v.scrollWidth, clientWidth: v.clientWidth},
          bar: {height: bar.getBoundingClientRect().height, opacity: cs.opacity, visibility: cs.visibility,
                display: cs.display}};
}"""

#: Where the keyboard focus is: in the page, or (when the grid's frame has it) the grid's focused cell.
FOCUS = """() => {
  const e = document.activeElement;
  if (!e || e.tagName !== 'IFRAME') {
    return {where: 'page', label: e ? (e.getAttribute('aria-label') || e.innerText || e.tagName).slice(0, 60) : null};
  }
  const inner = e.contentDocument && e.contentDocument.activeElement;
  return {where: 'frame', col: inner ? inner.getAttribute('col-id') : null,
          cls: inner ? String(inner.className).slice(0, 80) : null};
}"""


def open_finished_run(console, demo, browser, width: int, run_id: str):
    import loader

    ref = loader.start_run(demo.job, run_id=run_id, batch_size=100)
    loader.wait_for_run(demo.job, ref.etl_run_id, timeout=60)
    page = browser.new_page(viewport={"width": width, "height": 1400})
    page.goto(f"{console.url}/etl/data-loader/{demo.job}/{run_id}")
    grid = page.frame_locator(GRID)
    grid.locator(".ag-row[row-index='3'] [col-id='rows_attempted']").wait_for(timeout=30_000)
    return page, grid


def test_at_1280_px_all_ten_columns_show_without_scrolling_and_narrower_batch_and_status_stay_pinned(
        console, demo, browser):
    page, _ = open_finished_run(console, demo, browser, 1280, "widths")
    frame = page.frame(url=lambda u: "st_aggrid" in u)
    layout = frame.evaluate(LAYOUT)
    assert set(COLUMN_IDS) <= set(layout["heads"]), layout["heads"].keys()
    for col in COLUMN_IDS:
        box = layout["heads"][col]
        assert box["width"] > 40 and box["right"] <= layout["root"]["right"] + 1, (col, box, layout["root"])
    assert layout["scroll"]["scrollWidth"] <= layout["scroll"]["clientWidth"] + 1, layout["scroll"]

    page.set_viewport_size({"width": 900, "height": 1400})
    page.wait_for_function(f"""() => {{ const f = document.querySelector("{GRID}");
        const d = f && f.contentDocument; return !!d && !!d.querySelector(
        '.ag-pinned-left-header .ag-header-cell[col-id="status"]'); }}""", timeout=15_000)
    layout = frame.evaluate(LAYOUT)
    assert layout["heads"]["index"]["pinned"] and layout["heads"]["status"]["pinned"]
    assert layout["scroll"]["scrollWidth"] > layout["scroll"]["clientWidth"]  # the rest scrolls sideways
    bar = layout["bar"]
    assert bar["height"] >= 10 and bar["opacity"] == "1" and bar["visibility"] == "visible", bar


def test_tab_and_shift_tab_leave_the_grid_from_any_cell_and_arrows_move_inside(console, demo, browser):
    page, grid = open_finished_run(console, demo, browser, 1280, "tabbing")
    for row, col in (("0", "index"), ("2", "rows_inserted"), ("4", "error_message"), ("1", "status")):
        grid.locator(f".ag-row[row-index='{row}'] [col-id='{col}']").first.click()
        assert page.evaluate(FOCUS)["where"] == "frame"
        page.keyboard.press("ArrowRight" if col != "error_message" else "ArrowLeft")
        moved = page.evaluate(FOCUS)
        assert moved["where"] == "frame" and moved["col"] not in (None, col), moved  # arrows stay inside
        page.keyboard.press("Tab")
        assert page.evaluate(FOCUS)["where"] == "page", page.evaluate(FOCUS)
        grid.locator(f".ag-row[row-index='{row}'] [col-id='{col}']").first.click()
        page.keyboard.press("Shift+Tab")
        assert page.evaluate(FOCUS)["where"] == "page", page.evaluate(FOCUS)


@pytest.fixture
def big_run(idle_queue, demo, tmp_path, monkeypatch, target_schema):
    """A run of 3,000 planned batches (100 records each) that nobody loads: the grid holds 3,000 rows."""
    from loader import planning

    from ..helpers import write_catalog

    folder = tmp_path / "big"
    (folder / "data").mkdir(parents=True)
    with open(folder / "data" / "big.ndjson", "w") as f:
        f.writelines(f'{{"id": "r{i}", "customer": {{"id": {i % 7}}}}}\n' for i in range(300_000))
    catalog = write_catalog(folder, {demo.job: {"description": "3,000 batches", "source": "data/big.ndjson",
                                                "target_table": f"{target_schema}.big", "source_id": "id"}})
    monkeypatch.setenv("ETL_JOBS_FILE", str(catalog))
    import loader

    ref = loader.start_run(demo.job, run_id="three-thousand", batch_size=100)
    assert len(planning.plan_run(demo.job, ref.etl_run_id)) == 3000
    yield ref.etl_run_id
    loader.cancel_run(demo.job, ref.etl_run_id)


def test_the_whole_page_is_reachable_by_tab_with_a_3000_batch_run_open(big_run, demo, browser, workers):
    from .app_server import StreamlitServer
    from .conftest import ROOT

    console = StreamlitServer("Home.py", ROOT, log_dir=ROOT / ".pytest_cache")  # started with the big catalog
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(f"{console.url}/etl/data-loader/{demo.job}/{big_run}")
        grid = page.frame_locator(GRID)
        grid.locator(".ag-row[row-index='0'] [col-id='index']").wait_for(timeout=30_000)
        page.get_by_role("button", name="Cancel run").wait_for()
        page.evaluate("() => document.activeElement && document.activeElement.blur()")  # start from the top
        seen: list[dict] = []
        for _ in range(120):
            page.keyboard.press("Tab")
            seen.append(page.evaluate(FOCUS))
        labels = " | ".join(str(s.get("label")) for s in seen if s["where"] == "page")
        for control in ("ETL Job", "Run ID", "Batch Size", "Start Load", "Validation summary", "Cancel run",
                        "Download logs (NDJSON)", "Download metrics (CSV)", "pending"):  # pills: 1 stop, arrows inside
            assert control in labels, (control, labels)
        # The grid is entered and left: never more than two Tabs in a row inside its frame.
        runs, longest = 0, 0
        for s in seen:
            runs = runs + 1 if s["where"] == "frame" else 0
            longest = max(longest, runs)
        assert 1 <= longest <= 2, seen
        # The whole page was walked: the Tab order came back round to where it started.
        first = next(s for s in seen if s["where"] == "page" and s.get("label") and "ETL Job" in s["label"])
        assert seen.count(first) >= 2, labels
    finally:
        console.stop()
