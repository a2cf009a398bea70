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
#: streamlit-aggrid evaluates any string of its gridOptions wrapped in this marker (``new Function``).
JSC = "::JSCODE::(window.__xss=3)::JSCODE::"
#: Markdown that would make a link, an image and two autolinks if it were rendered as Markdown.
MD = "[click](javascript:window.__xss=4) ![i](x) https://evil.example/a www.evil.example me@evil.example"
GRID_IFRAME = "iframe[title='st_aggrid.AgGrid.agGrid']"


def assert_inert(page) -> None:
    """Nothing injected ran or was inserted, in the page or any frame; no traceback is shown."""
    page.wait_for_timeout(1000)  # an inserted <img src=x onerror=...> would fire within this
    for frame in page.frames:
        assert frame.evaluate("() => typeof window.__xss") == "undefined", f"injected code ran in {frame.url}"
        assert frame.locator("img[src='x']").count() == 0, frame.url
        assert frame.locator("script", has_text="__xss").count() == 0, frame.url
        links = frame.locator("a[href*='evil.example'], a[href^='javascript:'], a[href^='mailto:']")
        assert links.count() == 0, (frame.url, links.first.evaluate("e => e.parentElement.outerHTML.slice(0, 600)"))
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
    page.get_by_text(f"No run no-such-run for job {demo.job}").wait_for(timeout=15_000)
    assert_inert(page)

    # The JSON routes answer hostile ids with a 4xx JSON error, never HTML.
    for path in (f"{quote(IMG, safe='')}/r1", f"{demo.job}/{quote(IMG, safe='')}"):
        for tail in ("batches", "version", "batches/1", "logs.ndjson"):
            r = page.request.get(f"{console.url}/etl/data-loader/api/runs/{path}/{tail}")
            assert r.status == 400, (path, tail, r.status)
            assert r.headers["content-type"].startswith("application/json")
            assert "error" in r.json()


#: A source file name holding HTML, Markdown and the JS-code marker (matched by a glob in the catalog).
HOSTILE_FILE = f"hostile-{IMG} {JSC} [a](javascript:window.__xss=4).ndjson"


def hostile_run(tmp_path, target_schema: str, pg, console_catalog=None) -> tuple[str, str]:
    """A finished run whose rejected records, failed batch, file name and description carry HTML, Markdown
    and the grid's JS-code marker in every text the console shows.

    300 records in 3 batches; four fail the JSON Schema with hostile text in the value and in a key; a
    trigger on the target refuses record h250 with a hostile error message, so batch 2 fails for good.
    With ``console_catalog``, the job (with a hostile description) and a broken job with a hostile
    name are added to that catalog, so the console lists them.
    """
    job = job_name("hostile")
    table = f"{target_schema}.hostile"
    records: list[object] = [{"id": f"h{i}", "name": f"n{i}", "customer": {"id": i}} for i in range(300)]
    records[5] = {"id": "h5", "name": IMG, "customer": {"id": 5}}
    records[6] = {"id": "h6", "name": "n6", SCRIPT: IMG, "customer": {"id": 6}}
    records[7] = {"id": "h7", "name": "n7", "customer": {"id": None, "note": IMG}}
    records[8] = {"id": "h8", "name": JSC, "customer": {"id": 8}}
    records[9] = {"id": "h9", "name": MD, JSC: 1, "customer": {"id": 9}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "hostile.schema.json").write_text(json.dumps({
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 20}},
        "propertyNames": {"pattern": "^[a-z_]+$"}}))
    write_ndjson(tmp_path / HOSTILE_FILE, records)
    spec = {"description": f"{MD} {IMG} {JSC}", "source": str(tmp_path / "hostile-*.ndjson"),
            "target_table": table, "source_id": "id", "required": ["customer.id"],
            "schema": str(tmp_path / "hostile.schema.json")}
    catalog = write_catalog(tmp_path, {job: spec})
    if console_catalog is not None:
        broken = {"source": "x.ndjson", "target_table": "stg.x", "source_id": "id", "description": MD}
        (tmp_path / "extra").mkdir()
        with open(console_catalog, "a") as f:
            f.write("\n" + write_catalog(tmp_path / "extra", {job: spec, f"{IMG}{JSC}": broken}).read_text())
    create_target_table(pg, table)
    schema, name = table.split(".")
    pg.execute(sql.SQL("""CREATE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN IF NEW.source_id = 'h250' THEN RAISE EXCEPTION USING MESSAGE = {}, ERRCODE = '23514'; END IF;
        RETURN NEW; END $$""").format(sql.Identifier(schema, "html_guard"),
                                      sql.Literal(f"refused {IMG}{SCRIPT} {JSC} {MD}")))
    pg.execute(sql.SQL("CREATE TRIGGER html_guard BEFORE INSERT ON {} FOR EACH ROW EXECUTE FUNCTION {}()").format(
        sql.Identifier(schema, name), sql.Identifier(schema, "html_guard")))
    ref = loader.start_run(job, catalog=catalog, batch_size=100, run_id="hostile-html")
    c = loader.wait_for_run(job, ref.etl_run_id, timeout=90)
    assert c["status"] == "partial_success", c["status"]
    [failed] = [b for b in c["batches"] if b["status"] == "failed"]
    assert failed["index"] == 2 and IMG in failed["error_message"] and JSC in failed["error_message"]
    samples = " ".join(f"{e['path']} {e['message']} {e['sample_value']} {e['source_file']}"
                       for e in c["validation_summary"]["examples"])
    assert IMG in samples and SCRIPT in samples and JSC in samples and MD in samples
    return job, ref.etl_run_id


def test_html_in_rejected_records_and_batch_errors_shows_as_text_and_never_runs(console, demo, browser, pg,
                                                                               target_schema, tmp_path):
    job, run = hostile_run(tmp_path / "hostile", target_schema, pg, console_catalog=demo.catalog)
    # Wide enough for the grid to draw its last column (Error) without scrolling sideways.
    page = browser.new_page(viewport={"width": 2400, "height": 2300})
    page.goto(f"{console.url}/etl/data-loader/{job}/{run}")
    page.locator(".stMarkdownBadge", has_text="Partial success").first.wait_for(timeout=30_000)
    wait_for_grid(page)
    assert_inert(page)
    # The job's description and the broken job's name (catalog text) show as text.
    page.get_by_text(f"{MD} {IMG} {JSC}", exact=False).first.wait_for(timeout=15_000)
    page.get_by_text("job(s) in the catalog are broken").click()
    page.get_by_text(f"{IMG}{JSC}", exact=False).first.wait_for(timeout=15_000)
    assert_inert(page)

    page.get_by_text("Validation summary").click()
    page.get_by_text("JSON shape errors").wait_for()
    examples = page.locator('[data-testid="stDataFrame"]', has=page.get_by_text("Sample value"))
    examples.wait_for()
    expect(examples).to_contain_text(IMG)  # the grid's accessible cells hold the text
    expect(examples).to_contain_text(SCRIPT)
    expect(examples).to_contain_text(JSC)
    expect(examples).to_contain_text(HOSTILE_FILE)
    assert_inert(page)

    # Only failed batches; selecting the row shows its error, stack and logs.
    page.get_by_role("button", name="failed", exact=True).click()
    page.wait_for_url(re.compile(r"status=failed"), timeout=10_000)
    page.wait_for_function(f"() => document.querySelectorAll(\"{GRID_IFRAME}\").length === 1", timeout=10_000)
    grid = page.frame_locator(GRID_IFRAME)
    cell = grid.locator(".ag-row[row-index='0'] [col-id='index']")
    expect(cell).to_have_text("2", timeout=20_000)
    error_cell = grid.locator(".ag-row[row-index='0'] [col-id='error_message']")
    expect(error_cell).to_contain_text(f"refused {IMG}{SCRIPT} {JSC}")
    error_cell.hover()  # its tooltip shows the whole message
    grid.locator(".ag-tooltip").wait_for(timeout=10_000)
    expect(grid.locator(".ag-tooltip")).to_contain_text(IMG)
    cell.click()
    page.get_by_role("heading", name="Batch #2").wait_for(timeout=20_000)
    page.get_by_text(f"refused {IMG}{SCRIPT} {JSC} {MD}", exact=False).first.wait_for()
    page.locator('[data-testid="stText"]', has_text=HOSTILE_FILE).first.wait_for()  # the batch's lines and file
    assert_inert(page)
    page.get_by_role("tab", name="Retry timeline").click()
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
        page.locator('[data-testid="stException"], h3:has-text("Batch durations")').first.wait_for(timeout=30_000)
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


def wait_for_grid(page) -> None:
    """The batches grid is drawn (its options, initial filter state included, have been read)."""
    page.wait_for_function(f"() => document.querySelectorAll(\"{GRID_IFRAME}\").length === 1", timeout=30_000)
    page.frame_locator(GRID_IFRAME).locator(".ag-root").first.wait_for(timeout=30_000)


def test_js_code_markers_in_every_url_parameter_are_dropped_with_a_note_and_never_run(console, demo, browser):
    loader.start_run(demo.job, run_id="jscode", batch_size=500)
    assert loader.wait_for_run(demo.job, "jscode", timeout=60)["status"] == "success"
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    base = f"{console.url}/etl/data-loader"
    text = {"filterType": "text", "type": "contains", "filter": "a"}
    number = {"filterType": "number", "type": "equals", "filter": 1}
    dropped = [  # (query beside job and run, what the note names)
        ({"status": f"failed,{JSC}"}, "status"),
        ({"sort": json.dumps([{"colId": JSC, "sort": "asc"}])}, "sort"),
        ({"sort": json.dumps([{"colId": "index", "sort": JSC}])}, "sort"),
        ({"sort": json.dumps([{"colId": "index", "sort": "asc", "extra": JSC}])}, "sort"),
        ({"filter": json.dumps({JSC: text})}, "filter"),
        ({"filter": json.dumps({"error_message": {**text, "filter": JSC}})}, "filter"),
        ({"filter": json.dumps({"error_message": {**text, "filterType": JSC}})}, "filter"),
        ({"filter": json.dumps({"error_message": {**text, "type": JSC}})}, "filter"),
        ({"filter": json.dumps({"index": {**number, "extra": JSC}})}, "filter"),
        ({"filter": json.dumps({"index": {**number, "filterTo": JSC}})}, "filter"),
        ({"filter": json.dumps({"index": {"filterType": "number", "operator": JSC, "conditions": [number]}})},
         "filter"),
        ({"filter": json.dumps({"index": {"filterType": "number", "operator": "AND",
                                          "conditions": [number, {**number, "x": JSC}]}})}, "filter"),
    ]
    for extra, name in dropped:
        page.goto(f"{base}?{urlencode({'job': demo.job, 'run': 'jscode', **extra})}")
        page.get_by_text(f"The link's {name}").first.wait_for(timeout=30_000)
        wait_for_grid(page)
        assert_inert(page)
        assert JSC not in page.url  # the URL the page writes back holds only what was kept

    # Job and run ids with the marker, as query parameters and as the deep-link path.
    bad_run = "The link's run id is not valid (a UUID or a slug); nothing to show for it."
    bad_job = "The link's job id is not valid; nothing to show for it."
    for url, message in [
        (f"{base}?{urlencode({'job': JSC, 'run': 'jscode'})}", bad_job),
        (f"{base}?{urlencode({'job': demo.job, 'run': JSC})}", bad_run),
        (f"{base}/{quote(JSC, safe='')}/jscode", bad_job),
        (f"{base}/{demo.job}/{quote(JSC, safe='')}", bad_run),
    ]:
        open_page(page, url)
        page.get_by_text(message).wait_for(timeout=15_000)
        assert_inert(page)

    # The grid's own routes refuse the marker in a sort or filter (what the page would never send).
    api = f"{console.url}/etl/data-loader/api/runs/{demo.job}/jscode/batches"
    for extra, _ in dropped[1:]:
        r = page.request.get(f"{api}?{urlencode(extra)}")
        assert r.status == 400, (extra, r.status, r.text()[:200])

    # A filter the grid itself may hold is kept: it reaches the grid and the URL unchanged.
    kept = {"rows_attempted": {"filterType": "number", "type": "lessThan", "filter": 500}}
    page.goto(f"{base}?{urlencode({'job': demo.job, 'run': 'jscode', 'filter': json.dumps(kept)})}")
    wait_for_grid(page)
    grid = page.frame_locator(GRID_IFRAME)
    expect(grid.locator(".ag-row[row-index='0'] [col-id='rows_attempted']")).to_have_text("50", timeout=20_000)
    assert page.get_by_text("The link's").count() == 0
    assert_inert(page)


def test_hostile_actors_in_the_history_and_started_by_show_as_text_and_never_run(console, demo, browser, pg):
    """Actors come from a proxy header, ETL_ACTOR or a notebook: HTML, script and Markdown stay text."""
    import loader

    actor = f"{IMG}{SCRIPT} {MD}"
    ref = loader.start_run(demo.job, run_id="hostile-actor", batch_size=500, actor=actor)
    loader.wait_for_run(demo.job, ref.etl_run_id, timeout=60)
    page = browser.new_page(viewport={"width": 1280, "height": 1600})
    open_page(page, f"{console.url}/etl/data-loader/{demo.job}/hostile-actor")
    page.get_by_text(f"started by: {actor}").wait_for(timeout=30_000)
    history = page.locator(".dl-history li")
    assert history.count() == 1 and actor in history.inner_text()
    assert_inert(page)
