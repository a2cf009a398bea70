"""Hostile input in headless Chromium: ids, records and errors holding HTML show as text and never run.

Every page is checked the same way (``assert_inert``): no ``window.__xss`` in the page or any of its
frames (the batches grid is an iframe), no injected ``<img src=x>`` or ``<script>`` element, and no
traceback (no Streamlit exception element, no "Traceback" text outside a failed batch's error stack).
"""

from __future__ import annotations

import json
import re
from urllib.parse import quote, urlencode

import pytest
from playwright.sync_api import expect
from psycopg import sql

import loader

from ..helpers import create_target_table, job_name, write_catalog, write_ndjson

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.usefixtures("ledger")]

IMG = "<img src=x onerror=window.__xss=1>"
SCRIPT = "<script>window.__xss=2</script>"
GRID_IFRAME = "iframe[title='st_aggrid.AgGrid.agGrid']"


def assert_inert(page) -> None:
    """Nothing injected ran or was inserted, in the page or any frame; no traceback is shown."""
    page.wait_for_timeout(1000)  # an inserted <img src=x onerror=...> would fire within this
    for frame in page.frames:
        assert frame.evaluate("() => typeof window.__xss") == "undefined", f"injected code ran in {frame.url}"
        assert frame.locator("img[src='x']").count() == 0, frame.url
        assert frame.locator("script", has_text="__xss").count() == 0, frame.url
    assert page.locator('[data-testid="stException"]').count() == 0
    # A failed batch's error stack (a code block) is a traceback on purpose; anywhere else it is a crash.
    body = page.evaluate("() => { const b = document.body.cloneNode(true); "
                         "b.querySelectorAll('[data-testid=stCode]').forEach(e => e.remove()); return b.textContent; }")
    assert "Traceback" not in body and "Internal Server Error" not in body


def open_page(page, url: str) -> None:
    page.goto(url)
    page.get_by_role("heading", name="Run Configuration").wait_for(timeout=30_000)
    page.get_by_role("heading", name="Run Monitor").wait_for(timeout=30_000)


def test_html_and_script_in_deep_links_and_query_params_show_an_empty_state_as_text(console, demo, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    base = f"{console.url}/etl/data-loader"
    bad_run = "The link's run id is not valid (a UUID or a slug); nothing to show for it."
    bad_job = "The link's job id is not valid; nothing to show for it."
    cases = [
        (f"{base}/{demo.job}/{quote(IMG, safe='')}", bad_run),
        (f"{base}/{demo.job}/{quote(SCRIPT, safe='')}", bad_run),  # '/' in </script>: a third path segment
        (f"{base}/{quote(IMG, safe='')}/nightly-1", bad_job),
        (f"{base}?{urlencode({'job': SCRIPT, 'run': 'nightly-1'})}", bad_job),
        (f"{base}?{urlencode({'job': demo.job, 'run': SCRIPT})}", bad_run),
        (f"{base}?{urlencode({'job': demo.job, 'run': IMG + SCRIPT})}", bad_run),
        (f"{base}?{urlencode({'job': IMG, 'run': IMG})}", bad_job),
    ]
    for url, message in cases:
        open_page(page, url)
        page.get_by_text(message).wait_for(timeout=15_000)
        page.get_by_text("No run selected").wait_for()
        assert_inert(page)

    # A well-formed id that names no run: said in words, as text.
    open_page(page, f"{base}/{demo.job}/no-such-run")
    page.get_by_text(f"No run 'no-such-run' for job '{demo.job}'").wait_for(timeout=15_000)
    assert_inert(page)

    # The JSON routes answer hostile ids with a 4xx JSON error, never HTML.
    for path in (f"{quote(IMG, safe='')}/r1", f"{demo.job}/{quote(IMG, safe='')}"):
        for tail in ("batches", "version", "batches/1", "logs.ndjson"):
            r = page.request.get(f"{console.url}/etl/data-loader/api/runs/{path}/{tail}")
            assert r.status == 400, (path, tail, r.status)
            assert r.headers["content-type"].startswith("application/json")
            assert "error" in r.json()


def hostile_run(tmp_path, target_schema: str, pg) -> tuple[str, str]:
    """A finished run whose rejected records and failed batch carry HTML in every text the console shows.

    300 records in 3 batches; two fail the JSON Schema with HTML in the value and in a key; a trigger
    on the target refuses record h250 with an HTML error message, so batch 2 fails for good.
    """
    job = job_name("hostile")
    table = f"{target_schema}.hostile"
    records: list[object] = [{"id": f"h{i}", "name": f"n{i}", "customer": {"id": i}} for i in range(300)]
    records[5] = {"id": "h5", "name": IMG, "customer": {"id": 5}}
    records[6] = {"id": "h6", "name": "n6", SCRIPT: IMG, "customer": {"id": 6}}
    records[7] = {"id": "h7", "name": "n7", "customer": {"id": None, "note": IMG}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "hostile.schema.json").write_text(json.dumps({
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 20}},
        "propertyNames": {"pattern": "^[a-z_]+$"}}))
    write_ndjson(tmp_path / "hostile.ndjson", records)
    catalog = write_catalog(tmp_path, {job: {"source": "hostile.ndjson", "target_table": table, "source_id": "id",
                                             "required": ["customer.id"], "schema": "hostile.schema.json"}})
    create_target_table(pg, table)
    schema, name = table.split(".")
    pg.execute(sql.SQL("""CREATE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN IF NEW.source_id = 'h250' THEN RAISE EXCEPTION USING MESSAGE = {}, ERRCODE = '23514'; END IF;
        RETURN NEW; END $$""").format(sql.Identifier(schema, "html_guard"), sql.Literal(f"refused {IMG}{SCRIPT}")))
    pg.execute(sql.SQL("CREATE TRIGGER html_guard BEFORE INSERT ON {} FOR EACH ROW EXECUTE FUNCTION {}()").format(
        sql.Identifier(schema, name), sql.Identifier(schema, "html_guard")))
    ref = loader.start_run(job, catalog=catalog, batch_size=100, run_id="hostile-html")
    c = loader.wait_for_run(job, ref.etl_run_id, timeout=90)
    assert c["status"] == "partial_success", c["status"]
    [failed] = [b for b in c["batches"] if b["status"] == "failed"]
    assert failed["index"] == 2 and IMG in failed["error_message"]
    samples = " ".join(f"{e['path']} {e['message']} {e['sample_value']}" for e in c["validation_summary"]["examples"])
    assert IMG in samples and SCRIPT in samples
    return job, ref.etl_run_id


def test_html_in_rejected_records_and_batch_errors_shows_as_text_and_never_runs(console, demo, browser, pg,
                                                                               target_schema, tmp_path):
    job, run = hostile_run(tmp_path / "hostile", target_schema, pg)
    # Wide enough for the grid to draw its last column (Error) without scrolling sideways.
    page = browser.new_page(viewport={"width": 2400, "height": 2300})
    page.goto(f"{console.url}/etl/data-loader/{job}/{run}")
    page.locator(".stMarkdownBadge", has_text="Partial success").first.wait_for(timeout=30_000)
    assert_inert(page)

    page.get_by_text("Validation summary").click()
    page.get_by_text("JSON shape errors").wait_for()
    examples = page.locator('[data-testid="stDataFrame"]', has=page.get_by_text("Sample value"))
    examples.wait_for()
    expect(examples).to_contain_text(IMG)  # the grid's accessible cells hold the text
    expect(examples).to_contain_text(SCRIPT)
    assert_inert(page)

    # Only failed batches; selecting the row shows its error, stack and logs.
    page.get_by_role("button", name="failed", exact=True).click()
    page.wait_for_url(re.compile(r"status=failed"), timeout=10_000)
    page.wait_for_function(f"() => document.querySelectorAll(\"{GRID_IFRAME}\").length === 1", timeout=10_000)
    grid = page.frame_locator(GRID_IFRAME)
    cell = grid.locator(".ag-row[row-index='0'] [col-id='index']")
    expect(cell).to_have_text("2", timeout=20_000)
    error_cell = grid.locator(".ag-row[row-index='0'] [col-id='error_message']")
    expect(error_cell).to_contain_text(f"refused {IMG}{SCRIPT}")
    error_cell.hover()  # its tooltip shows the whole message
    grid.locator(".ag-tooltip").wait_for(timeout=10_000)
    expect(grid.locator(".ag-tooltip")).to_contain_text(IMG)
    cell.click()
    page.get_by_role("heading", name="Batch #2").wait_for(timeout=20_000)
    page.get_by_text(f"refused {IMG}{SCRIPT}").first.wait_for()
    assert_inert(page)
    page.get_by_role("tab", name="Error stack").click()
    page.locator('[data-testid="stCode"]', has_text=IMG).first.wait_for()
    assert_inert(page)
    page.get_by_role("tab", name="Structured logs").click()
    logs = page.locator('[data-testid="stJson"]').first
    logs.locator(".node-ellipsis").first.click()  # the event's details are folded at first
    expect(logs).to_contain_text(IMG)
    assert_inert(page)


def test_garbage_query_params_are_ignored_or_refused_never_a_traceback(console, demo, browser):
    loader.start_run(demo.job, run_id="garbage", batch_size=500)
    assert loader.wait_for_run(demo.job, "garbage", timeout=60)["status"] == "success"
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    deep = "[" * 5000 + "]" * 5000  # deeper than Python's json recursion limit
    garbage = [
        {"status": "bogus,<b>x</b>," + IMG},
        {"status": "failed," * 2000},
        {"sort": "not json"},
        {"sort": deep},
        {"sort": json.dumps({"colId": "index"})},
        {"sort": json.dumps([{"colId": ["index"], "sort": "asc"}])},
        {"sort": json.dumps([{"colId": IMG, "sort": "up"}])},
        {"filter": "{"},
        {"filter": deep},
        {"filter": json.dumps([1, 2])},
        {"filter": json.dumps({"index": {"conditions": 5}})},
        {"filter": json.dumps({"index": {"filterType": "number", "type": ["equals"], "filter": 1}})},
        {"filter": json.dumps({"status": {"filterType": "text", "type": {"x": 1}, "filter": "a"}})},
        {"filter": json.dumps({"index": {"type": "equals", "filter": "abc"}})},
        {"filter": json.dumps({"index": {"type": "equals", "filter": 10**30}})},
        {"filter": '{"rows_attempted": {"type": "inRange", "filter": -1e400, "filterTo": NaN}}'},
        {"filter": json.dumps({"error_message": {"type": "contains", "filter": "a\u0000b"}})},
        {"filter": json.dumps({IMG: {"type": "contains", "filter": SCRIPT}})},
        {"batch": "-1", "index": "abc", "start": "1e400", "end": "-5"},
        {"unknown": "x" * 20_000},
    ]
    for extra in garbage:
        url = f"{console.url}/etl/data-loader?{urlencode({'job': demo.job, 'run': 'garbage', **extra})}"
        page.goto(url)
        page.locator('[data-testid="stException"], h5:has-text("Batch durations")').first.wait_for(timeout=30_000)
        assert_inert(page)
        page.locator(".stMarkdownBadge", has_text="Success").first.wait_for(timeout=15_000)

    # The grid's JSON routes refuse the same garbage with a 4xx JSON error, never a 500.
    api = f"{console.url}/etl/data-loader/api/runs/{demo.job}/garbage"
    for query in [*garbage, {"start": "99999999999999999999999", "end": "100000000000000000000000"},
                  {"start": "abc"}, {"end": "0"}, {"sort": "[" * 1500 + "]" * 1500}]:
        r = page.request.get(f"{api}/batches?{urlencode(query)}")
        assert r.status in (200, 400), (query, r.status, r.text()[:200])
        assert r.headers["content-type"].startswith("application/json")
    for index in ("99999999999999999999", "-1", "abc", IMG):
        r = page.request.get(f"{api}/batches/{quote(index, safe='')}")
        assert r.status in (400, 404), (index, r.status, r.text()[:200])
