"""The console in headless Chromium against real PostgreSQL, Redis and `dataloader worker` processes."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

from ..helpers import create_poisoned_target_table, remove_poison

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.usefixtures("ledger")]

DOCS = Path(__file__).resolve().parents[2] / "docs"


#: One Start Load on the page, enabled (while Streamlit redraws, the old button can stand beside the new one).
START_ENABLED = ("() => { const b = [...document.querySelectorAll('button')].filter("
                 "b => b.innerText.includes('Start Load')); return b.length === 1 && !b[0].disabled; }")


#: No script run in progress (Streamlit marks its app element while the script runs).
APP_IDLE = "() => document.querySelector('.stApp')?.getAttribute('data-test-script-state') === 'notRunning'"


def metric(page, label: str):
    """The value of the Run Monitor's metric card ``label`` (a ``<dt>``/``<dd>`` pair in the cards' ``<dl>``)."""
    return page.locator(f'.dl-cards .dl-card:has(dt:text-is("{label}")) dd').first


def start_from_the_ui(page, console, demo, batch_size: int = 100, screenshot: str | None = None) -> str:
    page.goto(f"{console.url}/etl/data-loader")
    page.get_by_role("heading", name="Run Configuration").wait_for(timeout=30_000)
    if screenshot:
        page.get_by_text("No run selected").wait_for()
        page.get_by_role("button", name="Start Load").wait_for()
        page.get_by_text("Choose a job to see its recent runs.").wait_for()
        page.wait_for_timeout(1000)
        page.screenshot(path=str(DOCS / screenshot))
    job = page.get_by_role("combobox", name="ETL Job")
    job.click()
    page.keyboard.type(demo.job)
    page.keyboard.press("Enter")
    size = page.get_by_label("Batch Size", exact=True)
    size.fill(str(batch_size))
    size.press("Enter")
    run_id = page.get_by_label("Run ID", exact=True).input_value()
    page.wait_for_function(START_ENABLED, timeout=10_000)
    page.get_by_role("button", name="Start Load").click()
    return run_id


def test_a_run_started_from_the_ui_finishes_with_correct_counts(console, demo, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    run_id = start_from_the_ui(page, console, demo, screenshot="console-empty.png")

    page.get_by_text(f"etl_run_id: {run_id}").wait_for(timeout=30_000)
    page.locator(".stMarkdownBadge", has_text="Success").first.wait_for(timeout=60_000)
    # The ARIA live region says the same, for screen readers.
    page.locator(".dl-sr-only[role=status][aria-live=polite]", has_text="Run Success.").wait_for(state="attached")
    expect(metric(page, "Rows inserted")).to_have_text(f"{demo.rows - demo.invalid:,}", timeout=10_000)
    assert metric(page, "Rows inserted").inner_text() == f"{demo.rows - demo.invalid:,}"
    assert metric(page, "Rows updated").inner_text() == "0"
    assert metric(page, "Batches total").inner_text() == "11"
    assert metric(page, "Batches failed").inner_text() == "0"
    assert re.search(rf"[?&]job={re.escape(demo.job)}(&|$)", page.url)
    assert f"run={run_id}" in page.url

    # The grid pages its rows from the app's JSON routes (infinite row model).
    grid = page.frame_locator("iframe[title='st_aggrid.AgGrid.agGrid']")
    grid.locator(".ag-row[row-index='10'] [col-id='index']").wait_for(timeout=20_000)
    expect(grid.locator(".ag-row[row-index='10'] [col-id='rows_attempted']")).to_have_text("50", timeout=15_000)

    # Downloads are real URLs served by the app, streamed from the ledger.
    logs_href = page.get_by_role("link", name="Download logs (NDJSON)").get_attribute("href")
    logs = page.request.get(f"{console.url}{logs_href}")
    assert logs.ok and "ndjson" in logs.headers["content-type"]
    events = [json.loads(line) for line in logs.text().splitlines()]
    assert {e["run"] for e in events} == {run_id}
    assert sum(e["event"] == "batch_committed" for e in events) == 11
    metrics_href = page.get_by_role("link", name="Download metrics (CSV)").get_attribute("href")
    rows = list(csv.DictReader(io.StringIO(page.request.get(f"{console.url}{metrics_href}").text())))
    run_row = next(r for r in rows if r["row_type"] == "run")
    assert int(run_row["rows_inserted"]) == demo.rows - demo.invalid

    page.get_by_text("Validation summary").click()
    page.get_by_text("Required field errors").wait_for()
    page.wait_for_timeout(1500)
    DOCS.mkdir(exist_ok=True)
    page.set_viewport_size({"width": 1280, "height": 2300})
    page.wait_for_timeout(1500)
    page.screenshot(path=str(DOCS / "console-1280.png"))
    page.set_viewport_size({"width": 800, "height": 3400})
    page.wait_for_timeout(1500)
    page.screenshot(path=str(DOCS / "console-800.png"))
    # Below 1024 px the two panels stack: the monitor starts below the configuration.
    config_box = page.get_by_role("heading", name="Run Configuration").bounding_box()
    monitor_box = page.get_by_role("heading", name="Run Monitor").bounding_box()
    assert monitor_box["y"] > config_box["y"] + 100


def test_deep_link_opens_the_run_monitor(console, demo, browser):
    import loader

    ref = loader.start_run(demo.job, run_id="deep-linked", batch_size=500)
    loader.wait_for_run(demo.job, ref.etl_run_id, timeout=60)
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(f"{console.url}/etl/data-loader/{demo.job}/deep-linked")
    page.get_by_text("etl_run_id: deep-linked").wait_for(timeout=30_000)
    assert page.url.endswith(f"/etl/data-loader?job={demo.job}&run=deep-linked")
    assert metric(page, "Batches total").inner_text() == "3"


def test_a_failed_batch_shows_its_error_and_retry_from_the_ui_completes_the_run(console, demo, browser, pg,
                                                                                  target_schema):
    import loader

    create_poisoned_target_table(pg, f"{target_schema}.items", "r250")
    ref = loader.start_run(demo.job, run_id="with-failure", batch_size=100)
    assert loader.wait_for_run(demo.job, ref.etl_run_id, timeout=60)["status"] == "partial_success"

    page = browser.new_page(viewport={"width": 1280, "height": 2300}, timezone_id="Europe/Paris")
    page.goto(f"{console.url}/etl/data-loader/{demo.job}/with-failure")
    page.locator(".stMarkdownBadge", has_text="Partial success").first.wait_for(timeout=30_000)
    assert metric(page, "Batches failed").inner_text() == "1"

    # Only failed batches, kept in the URL; selecting the row shows error, stack and timeline.
    page.get_by_role("button", name="failed", exact=True).click()
    page.wait_for_url(re.compile(r"status=failed"), timeout=30_000)  # a rerun under a loaded CI can take long
    page.wait_for_function("() => document.querySelectorAll(\"iframe[title='st_aggrid.AgGrid.agGrid']\").length === 1",
                           timeout=10_000)  # the filtered grid replaces the unfiltered one
    grid = page.frame_locator("iframe[title='st_aggrid.AgGrid.agGrid']")
    cell = grid.locator(".ag-row[row-index='0'] [col-id='index']")
    expect(cell).to_have_text("2", timeout=20_000)
    assert grid.locator(".ag-center-cols-container .ag-row").count() == 1
    cell.click()
    page.get_by_role("heading", name="Batch #2").wait_for(timeout=20_000)
    page.get_by_text("poison record").first.wait_for()
    # The retry timeline in the viewer's time zone, UTC on hover (as the grid's Committed at).
    started = page.locator(".dl-timeline tbody tr").first.locator("time").first
    utc = started.get_attribute("datetime")
    assert started.get_attribute("title") == f"UTC: {utc}" and utc.endswith("Z")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d CES?T", started.inner_text())
    page.get_by_role("tab", name="Error stack").click()
    page.wait_for_timeout(500)
    page.screenshot(path=str(DOCS / "console-failed-batch.png"))

    remove_poison(pg, f"{target_schema}.items")
    page.get_by_role("button", name="Retry failed batches").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_role("button", name="Retry failed batches").click()
    page.locator(".stMarkdownBadge", has_text="Success").first.wait_for(timeout=60_000)
    expect(metric(page, "Rows inserted")).to_have_text(f"{demo.rows - demo.invalid:,}", timeout=10_000)
    assert metric(page, "Batches failed").inner_text() == "0"
    assert metric(page, "Retries attempted").inner_text() == "1"


def test_the_page_and_the_grid_have_no_axe_violations_of_any_impact_best_practices_included(console, demo, browser):
    from axe_playwright_python.sync_playwright import Axe

    import loader

    ref = loader.start_run(demo.job, run_id="axe", batch_size=500)
    loader.wait_for_run(demo.job, ref.etl_run_id, timeout=60)
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    page.goto(f"{console.url}/etl/data-loader/{demo.job}/axe")
    page.locator(".stMarkdownBadge", has_text="Success").first.wait_for(timeout=30_000)
    page.get_by_text("Validation summary").click()
    page.get_by_text("Required field errors").wait_for()
    page.frame_locator("iframe[title='st_aggrid.AgGrid.agGrid']").locator(".ag-row").first.wait_for()
    grid = page.frame(url=re.compile(r"st_aggrid"))
    assert grid is not None
    # Every rule of these tags, every impact. axe-core checks a frame through the axe present in it, as
    # part of the page (the page-level rules, such as one main landmark and one h1, hold for the page).
    options = {"runOnly": {"type": "tag", "values": ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa",
                                                     "best-practice"]}}
    axe = Axe()
    grid.evaluate(axe.axe_script)
    result = axe.run(page, options=options)
    assert result.violations_count == 0, result.generate_report()
    in_grid = [n for rule in result.response["passes"] for n in rule["nodes"] if len(n["target"]) == 2]
    assert in_grid, "the grid's frame was not checked"


def test_a_run_can_be_started_with_the_keyboard_only(console, demo, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(f"{console.url}/etl/data-loader")
    page.get_by_role("heading", name="Run Configuration").wait_for(timeout=30_000)

    def tab_to(check: str, limit: int = 40) -> None:
        for _ in range(limit):
            page.keyboard.press("Tab")
            if page.evaluate(f"() => {{ const e = document.activeElement; return !!e && ({check}); }}"):
                return
        raise AssertionError(f"never reached {check}")

    tab_to("e.getAttribute('aria-label') === 'ETL Job'")
    page.keyboard.type(demo.job)
    page.keyboard.press("Enter")
    tab_to("e.getAttribute('aria-label') === 'Run ID'")
    page.keyboard.press("ControlOrMeta+a")
    page.keyboard.type("keyboard-run")
    page.keyboard.press("Enter")
    page.wait_for_function(START_ENABLED, timeout=10_000)
    # The rerun the Run ID's Enter started must be over: an Enter on a button that the rerun then replaces
    # is lost (seen in CI and once alone here).
    page.wait_for_function(APP_IDLE, timeout=30_000)
    page.wait_for_function(START_ENABLED, timeout=10_000)
    tab_to("e.tagName === 'BUTTON' && e.innerText.includes('Start Load')")
    # The focused control shows a visible focus ring.
    outline = page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("", "none")
    # Enter goes to the enabled Start Load that is on the page now (not one a rerun just replaced).
    page.wait_for_function("() => { const e = document.activeElement; return !!e && e.isConnected && "
                           "e.innerText.includes('Start Load') && !e.disabled; }", timeout=10_000)
    page.keyboard.press("Enter")
    page.get_by_text("etl_run_id: keyboard-run").wait_for(timeout=30_000)


def test_grid_sort_and_filters_live_in_the_url_and_survive_a_reload(console, demo, browser):
    import loader

    ref = loader.start_run(demo.job, run_id="sorted", batch_size=100)
    loader.wait_for_run(demo.job, ref.etl_run_id, timeout=60)
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    page.goto(f"{console.url}/etl/data-loader/{demo.job}/sorted")
    grid = page.frame_locator("iframe[title='st_aggrid.AgGrid.agGrid']")
    first = grid.locator(".ag-center-cols-container .ag-row[row-index='0'] [col-id='rows_attempted']")
    first.wait_for(timeout=30_000)
    expect(first).to_have_text("100", timeout=15_000)  # a block arrives after the grid's load debounce
    grid.get_by_role("columnheader", name="Rows attempted").locator(".ag-header-cell-label").click()
    page.wait_for_url(re.compile(r"sort=.*rows_attempted"), timeout=10_000)
    page.wait_for_function("() => true")
    page.reload()
    first = grid.locator(".ag-center-cols-container .ag-row[row-index='0'] [col-id='rows_attempted']")
    first.wait_for(timeout=30_000)
    expect(first).to_have_text("50", timeout=15_000)  # ascending: the short last batch first, as the URL says
    assert "sort=" in page.url


def test_a_change_in_the_ledger_appears_on_the_page_without_a_reload(console, demo, browser, idle_queue):
    """The monitor follows the ledger by itself (its lag is measured in bench/console.py --panels, not here)."""
    import loader

    loader.start_run(demo.job, run_id="live")  # nobody listens to idle_queue: it stays queued
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(f"{console.url}/etl/data-loader/{demo.job}/live")
    page.locator(".stMarkdownBadge", has_text="Queued").first.wait_for(timeout=30_000)
    page.wait_for_timeout(500)
    loader.cancel_run(demo.job, "live")
    page.locator(".stMarkdownBadge", has_text="Canceled").first.wait_for(timeout=15_000)


def test_a_canceled_runs_unstarted_batches_say_so_in_the_grid_the_filter_the_cards_and_the_contract(
        console, demo, browser, idle_queue):
    import loader
    from loader import loading, planning, runs

    loader.start_run(demo.job, run_id="canceled", batch_size=200)  # 1050 rows: 6 batches; nobody listens
    planning.plan_run(demo.job, "canceled")
    assert loading.load_batch(demo.job, "canceled", 0).status == "succeeded"
    runs.cancel(demo.job, "canceled", actor="test")
    for index in range(1, 6):  # a queued job of a canceled run, delivered: its batch is recorded never to run
        assert loading.load_batch(demo.job, "canceled", index).status == "skipped"
    m = loader.run_contract(demo.job, "canceled")["metrics"]
    assert (m["batches_succeeded"], m["batches_canceled"], m["batches_pending"]) == (1, 5, 0)

    page = browser.new_page(viewport={"width": 1280, "height": 1600})
    page.goto(f"{console.url}/etl/data-loader/{demo.job}/canceled")
    page.locator(".stMarkdownBadge", has_text="Canceled").first.wait_for(timeout=30_000)
    assert metric(page, "Batches canceled").inner_text() == "5"
    grid = page.frame_locator("iframe[title='st_aggrid.AgGrid.agGrid']")
    status = grid.locator(".ag-row[row-index='1'] [col-id='status'] .dl-status")
    expect(status).to_have_attribute("title", "not started (run canceled)", timeout=20_000)
    assert "not started (run canceled)" in status.inner_text()
    page.get_by_role("button", name="canceled", exact=True).click()
    page.wait_for_url(re.compile(r"status=canceled"), timeout=10_000)
    page.wait_for_function("() => document.querySelectorAll(\"iframe[title='st_aggrid.AgGrid.agGrid']\").length === 1",
                           timeout=10_000)
    expect(grid.locator(".ag-row[row-index='0'] [col-id='index']")).to_have_text("1", timeout=20_000)
    assert grid.locator(".ag-center-cols-container .ag-row").count() == 5


def test_the_live_region_is_one_node_whose_text_follows_the_run(console, demo, browser, idle_queue):
    """Screen readers announce a live region's changes, not a region replaced by a new one."""
    import loader
    from loader import loading, planning

    loader.start_run(demo.job, run_id="announced", batch_size=200)  # 6 batches; nobody listens to idle_queue
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(f"{console.url}/etl/data-loader/{demo.job}/announced")
    region = page.locator("[role=status][aria-live=polite]")
    expect(region).to_have_text("Run Queued. About 0 percent of batches done.", timeout=30_000)
    assert region.count() == 1
    region.evaluate("node => { node.__sameNode = 'yes'; }")
    planning.plan_run(demo.job, "announced")
    for index in range(3):
        loading.load_batch(demo.job, "announced", index)
    expect(region).to_have_text("Run Loading. About 50 percent of batches done.", timeout=15_000)
    assert region.evaluate("node => node.__sameNode") == "yes"
    loader.cancel_run(demo.job, "announced")  # the run ends: the whole page is drawn again
    expect(region).to_have_text(re.compile(r"^Run Canceled\. 3 of 6 batches done, 0 failed"), timeout=15_000)
    page.locator(".stMarkdownBadge", has_text="Canceled").first.wait_for()
    page.wait_for_timeout(2000)  # a few more ticks of the monitor
    assert region.count() == 1 and region.evaluate("node => node.__sameNode") == "yes"
