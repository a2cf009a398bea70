"""The Data Loader page's logic under Streamlit's AppTest: validation, disabled states, query params."""

from __future__ import annotations

import itertools

import pytest

import loader

pytestmark = pytest.mark.usefixtures("ledger")


def start_button(at):
    return next(b for b in at.button if b.label == "Start Load")


def plain(markdown: str) -> str:
    """Markdown escaped by ui.format.md_text, back to the text people read."""
    return markdown.replace("\\", "")


def alerts(at, kind: str = "error") -> str:
    """The text of the page's alert boxes of one kind (ui.text.alert: escaped HTML), as people read it."""
    import html
    import re

    bodies = [h.proto.body for h in at.get("html") if f"dl-alert-{kind}" in h.proto.body]
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", b)) for b in bodies)


def errors(at) -> str:
    return alerts(at, "error")


def test_start_load_is_disabled_until_a_job_is_chosen(page, demo):
    at = page.run()
    assert not at.exception
    assert start_button(at).disabled
    at.selectbox(key="cfg_job").select(demo.job).run()
    assert not start_button(at).disabled


def test_run_id_is_prefilled_with_a_uuid(page, demo):
    import uuid

    at = page.run()
    uuid.UUID(at.text_input(key="cfg_run_id").value)


def test_run_id_that_is_neither_uuid_nor_slug_shows_why_and_disables_start(page, demo):
    at = page.run()
    at.selectbox(key="cfg_job").select(demo.job).run()
    at.text_input(key="cfg_run_id").input("Not A Slug!").run()
    assert start_button(at).disabled
    assert "Not a valid Run ID" in errors(at)
    at.text_input(key="cfg_run_id").input("nightly-2026_11").run()
    assert not start_button(at).disabled
    assert "Run ID" not in errors(at)


def captions(at) -> str:
    """The text of the page's captions written by ui.text.caption (escaped HTML)."""
    import html
    import re

    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", h.proto.body)) for h in at.get("html")
                    if 'class="dl-caption"' in h.proto.body)


def test_batch_size_defaults_to_1000_with_the_env_helper_visible_under_the_field(page):
    at = page.run()
    size = at.number_input(key="cfg_batch")
    assert size.value == 1000
    assert size.help == "Env: ETL_BATCH_SIZE"
    assert "Env: ETL_BATCH_SIZE = 1000 (in force)" in captions(at)  # on the page, not only in a tooltip


def test_batch_size_default_comes_from_etl_batch_size(page, monkeypatch):
    monkeypatch.setenv("ETL_BATCH_SIZE", "2500")
    at = page.run()
    assert at.number_input(key="cfg_batch").value == 2500
    assert "Env: ETL_BATCH_SIZE = 2500 (in force)" in captions(at)


def test_batch_size_default_is_the_jobs_own_batch_size_from_the_catalog(page, demo, monkeypatch, tmp_path):
    from ..helpers import write_catalog

    folder = tmp_path / "sized"
    folder.mkdir()
    catalog = write_catalog(folder, {
        demo.job: {"source": "x.ndjson", "target_table": "staging.x", "source_id": "id", "batch_size": 300},
        "other": {"source": "x.ndjson", "target_table": "staging.y", "source_id": "id"}})
    monkeypatch.setenv("ETL_JOBS_FILE", str(catalog))
    monkeypatch.setenv("ETL_BATCH_SIZE", "2500")
    at = page.run()
    at.selectbox(key="cfg_job").select(demo.job).run()
    assert at.number_input(key="cfg_batch").value == 300
    assert "batch_size = 300 in the catalog" in captions(at) and "ETL_BATCH_SIZE = 2500" in captions(at)
    at.selectbox(key="cfg_job").select("other").run()
    assert at.number_input(key="cfg_batch").value == 2500


@pytest.mark.parametrize("value, message", [
    (10_001, "Batch size must be from 100 to 10000, found 10001"),
    (99, "Batch size must be from 100 to 10000, found 99"),
    (None, "Batch size is required (100 to 10000)"),
])
def test_a_batch_size_out_of_range_or_empty_disables_start_with_the_message_under_the_field(page, demo, value,
                                                                                            message):
    at = page.run()
    at.selectbox(key="cfg_job").select(demo.job).run()
    at.number_input(key="cfg_batch").set_value(value).run()
    assert not at.exception
    assert start_button(at).disabled
    assert message in errors(at)
    at.number_input(key="cfg_batch").set_value(10_000).run()
    assert not start_button(at).disabled and "Batch size" not in errors(at)


def test_a_reused_run_id_is_an_error_under_the_field_with_a_link_to_that_run(page, demo, idle_queue):
    loader.start_run(demo.job, run_id="used-once")
    loader.cancel_run(demo.job, "used-once")
    at = page.run()
    at.selectbox(key="cfg_job").select(demo.job).run()
    at.text_input(key="cfg_run_id").input("used-once").run()
    assert start_button(at).disabled
    assert "Run ID used-once is already used by a run started" in errors(at)
    box = next(h.proto.body for h in at.get("html") if "already used" in h.proto.body)
    assert f'href="/etl/data-loader/{demo.job}/used-once"' in box
    assert not at.get("dialog") or all("in progress" not in d.proto.title for d in at.get("dialog"))


def test_a_run_id_taken_after_the_check_is_said_under_the_field_not_by_the_in_progress_dialog(page, demo,
                                                                                             idle_queue):
    at = page.run()
    at.selectbox(key="cfg_job").select(demo.job).run()
    at.text_input(key="cfg_run_id").input("raced").run()
    assert not start_button(at).disabled
    loader.start_run(demo.job, run_id="raced")  # someone else (the CLI) takes it and finishes
    loader.cancel_run(demo.job, "raced")
    start_button(at).click().run()
    assert not at.exception
    assert "already used" in errors(at)
    assert not any(b.key == "dlg-force-yes" for b in at.button)
    assert len(loader.list_runs(demo.job)) == 1


def test_dedup_callout_is_shown(page):
    at = page.run()
    assert any("Deduplication uses source_id" in i.value for i in at.info)


def test_empty_monitor_when_no_run_is_selected(page):
    at = page.run()
    assert any("No run selected" in i.value for i in at.info)


def test_start_load_queues_a_run_and_puts_job_and_run_in_the_url(page, demo, idle_queue):
    at = page.run()
    at.selectbox(key="cfg_job").select(demo.job).run()
    at.text_input(key="cfg_run_id").input("apptest-start").run()
    at.number_input(key="cfg_batch").set_value(200).run()
    start_button(at).click().run()
    assert not at.exception
    assert at.query_params["job"] == demo.job
    assert at.query_params["run"] == "apptest-start"
    runs = loader.list_runs(demo.job)
    assert runs[0]["etl_run_id"] == "apptest-start" and runs[0]["batch_size"] == 200
    assert any("etl_run_id: apptest-start" in t.value.splitlines() for t in at.text)
    loader.cancel_run(demo.job, "apptest-start")


def test_start_while_a_run_is_in_progress_asks_for_confirmation(page, demo, idle_queue):
    loader.start_run(demo.job, run_id="in-progress")
    at = page.run()
    at.selectbox(key="cfg_job").select(demo.job).run()
    assert any("in-progress" in plain(w.value) for w in at.warning)
    start_button(at).click().run()
    assert not at.exception
    assert len(loader.list_runs(demo.job)) == 1  # nothing started without confirmation
    assert any("in-progress" in t.value for t in at.text)  # the dialog names the run in progress
    at.button(key="dlg-force-yes").click().run()
    assert not at.exception
    assert len(loader.list_runs(demo.job)) == 2
    assert not any(b.key == "dlg-force-yes" for b in at.button)  # and closes
    for r in loader.list_runs(demo.job):
        loader.cancel_run(demo.job, r["etl_run_id"])


def test_the_in_progress_dialog_closes_when_the_run_ends_before_the_answer(page, demo, idle_queue):
    loader.start_run(demo.job, run_id="ends-soon")
    at = page.run()
    at.selectbox(key="cfg_job").select(demo.job).run()
    start_button(at).click().run()
    assert any(b.key == "dlg-force-yes" for b in at.button)
    loader.cancel_run(demo.job, "ends-soon")
    at.run()
    assert not any(b.key == "dlg-force-yes" for b in at.button)
    assert "nothing was started" in alerts(at, "info")
    assert not any("ends-soon" in plain(w.value) for w in at.warning)  # the left panel's warning follows
    start_button(at).click().run()  # now nothing runs: the next click starts
    assert len(loader.list_runs(demo.job)) == 2
    loader.cancel_run(demo.job, loader.list_runs(demo.job)[0]["etl_run_id"])


def test_the_force_dialog_states_the_loaders_rule_for_the_later_record():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "later-started run first" in readme and "its place in the source" in readme
    source = Path(__file__).resolve().parents[2].joinpath("pages", "data_loader.py").read_text()
    assert "the later commit of a record wins" not in source and "later-started run's wins" in source


def test_query_params_open_the_monitor_of_a_deep_linked_run(page, demo, idle_queue):
    loader.start_run(demo.job, run_id="deep-link")
    page.query_params["job"] = demo.job
    page.query_params["run"] = "deep-link"
    at = page.run()
    assert not at.exception
    assert any(f"etl_job_id: {demo.job}" in t.value.splitlines() for t in at.text)
    assert any("etl_run_id: deep-link" in t.value.splitlines() for t in at.text)
    assert at.selectbox(key="cfg_job").value == demo.job
    loader.cancel_run(demo.job, "deep-link")


@pytest.mark.parametrize("params", [
    {"job": "<script>alert(1)</script>", "run": "x"},
    {"job": "nope", "run": "'; DROP TABLE runs; --"},
    {"job": "nope", "run": "not-a-run"},
    {"run": "only-a-run", "status": "bogus", "sort": "{not json", "filter": "[1,2"},
    {"job": "nope", "run": "not-a-run", "sort": "5", "filter": "\"text\""},
])
def test_garbage_query_params_give_an_empty_state_not_a_traceback(page, params):
    for k, v in params.items():
        page.query_params[k] = v
    at = page.run()
    assert not at.exception
    shown = " ".join(plain(i.value) for i in at.info)
    assert "No run selected" in shown or "No run `not-a-run`" in shown


def test_user_text_is_escaped_in_markdown(page, demo):
    from ui.format import md_text

    assert md_text("[x](javascript:alert(1)) <b>") == r"\[x\]\(javascript\:alert\(1\)\) \<b\>"


def test_cancel_asks_for_confirmation_then_cancels_the_run(page, demo, idle_queue):
    loader.start_run(demo.job, run_id="to-cancel")
    page.query_params["job"] = demo.job
    page.query_params["run"] = "to-cancel"
    at = page.run()
    cancel = next(b for b in at.button if b.label == "Cancel run")
    assert not cancel.disabled
    cancel.click().run()
    assert loader.list_runs(demo.job)[0]["status"] == "queued"  # not before the dialog says yes
    at.button(key="dlg-cancel-yes").click().run()
    assert not at.exception
    assert loader.list_runs(demo.job)[0]["status"] == "canceled"


def test_database_outage_shows_a_stale_badge_and_keeps_the_last_numbers(page, demo, idle_queue, monkeypatch):
    loader.start_run(demo.job, run_id="outage")
    page.query_params["job"] = demo.job
    page.query_params["run"] = "outage"
    at = page.run()
    assert any("etl_run_id: outage" in t.value.splitlines() for t in at.text)

    def down(*args, **kwargs):
        raise loader.TransientDbError("database error, will retry: connection refused")

    monkeypatch.setattr(loader, "run_contract", down)
    monkeypatch.setattr(loader, "change_signature", down)
    at.run()
    assert not at.exception
    assert "connection refused" in alerts(at, "warning")
    assert any("etl_run_id: outage" in t.value.splitlines() for t in at.text)  # the last data stays on screen
    assert any("will retry" in plain(t.value) for t in at.toast)
    monkeypatch.undo()
    loader.cancel_run(demo.job, "outage")


def test_toasts_say_transient_db_error_will_retry_and_run_completed(page, demo, idle_queue, monkeypatch):
    loader.start_run(demo.job, run_id="toasts")
    page.query_params["job"] = demo.job
    page.query_params["run"] = "toasts"
    at = page.run()
    real = loader.run_contract

    def with_transient_errors(*a, **k):
        c = real(*a, **k)
        c["metrics"]["transient_errors"] = 2
        return c

    monkeypatch.setattr(loader, "run_contract", with_transient_errors)
    moves = itertools.count()
    monkeypatch.setattr(loader, "change_signature", lambda *a, **k: next(moves))  # "the ledger moved": read it again
    at.run()
    assert any("Transient DB error" in t.value and "will retry" in t.value for t in at.toast)
    monkeypatch.setattr(loader, "run_contract", lambda *a, **k: {**real(*a, **k), "status": "success"})
    at.run()
    assert not at.exception
    assert any("Run completed" in t.value for t in at.toast)
    monkeypatch.undo()
    loader.cancel_run(demo.job, "toasts")


def test_a_refresh_with_an_unchanged_ledger_reuses_the_contract_and_a_change_reloads_it(page, demo, idle_queue,
                                                                                         monkeypatch):
    loader.start_run(demo.job, run_id="cached")
    page.query_params["job"] = demo.job
    page.query_params["run"] = "cached"
    at = page.run()
    real = loader.run_contract
    calls: list[str] = []

    def counted(*a, **k):
        calls.append(a[1])
        return real(*a, **k)

    monkeypatch.setattr(loader, "run_contract", counted)
    at.run()
    at.run()
    assert calls == []  # nothing moved in the ledger: no aggregate over the run's batches
    loader.cancel_run(demo.job, "cached")
    at.run()
    assert calls == ["cached"]
    assert any("Canceled" in m.value for m in at.markdown)  # the status badge


def test_the_collapsed_validation_summary_draws_nothing_inside(page, demo, idle_queue):
    loader.start_run(demo.job, run_id="lazy")
    page.query_params["job"] = demo.job
    page.query_params["run"] = "lazy"
    at = page.run()
    assert [e.label for e in at.expander] == ["Validation summary"]
    assert not at.expander[0].children  # its metrics, examples and download are sent only once opened
    assert not any(m.label == "Required field errors" for m in at.metric)
    loader.cancel_run(demo.job, "lazy")


def test_the_monitor_shows_times_and_cards_and_charts_each_committed_batch_with_the_p95(page, demo, idle_queue):
    import json

    import pyarrow as pa

    from loader import loading, planning

    loader.start_run(demo.job, run_id="charted", batch_size=500)  # 1050 rows: 3 batches; no worker listens
    planning.plan_run(demo.job, "charted")
    for index in (0, 1):
        assert loading.load_batch(demo.job, "charted", index).status == "succeeded"
    page.query_params["job"] = demo.job
    page.query_params["run"] = "charted"
    at = page.run()
    assert not at.exception
    c = loader.run_contract(demo.job, "charted")
    cards = next(h.proto.body for h in at.get("html") if 'class="dl-cards"' in h.proto.body)
    assert "<dt class=\"dl-l\">Batches total</dt><dd class=\"dl-v\">3</dd>" in cards
    assert "<dt class=\"dl-l\">Batches succeeded</dt><dd class=\"dl-v\">2</dd>" in cards
    assert f'<time datetime="{c["started_at"]}" title="UTC: {c["started_at"]}">' in cards
    durations, rates = at.get("vega_lite_chart")
    spec = json.loads(durations.proto.spec)
    line, rule = spec["layer"]
    assert line["mark"]["type"] == "line" and rule["mark"]["type"] == "rule"
    assert rule["data"]["values"] == [{"p95": c["metrics"]["batch_duration_ms_p95"]}]
    drawn = pa.ipc.open_stream(durations.proto.data.data).read_all().to_pydict()
    assert sorted(drawn["batch"]) == [0, 1] and drawn["duration_ms"] and "rows_per_s" in drawn
    assert json.loads(rates.proto.spec)["mark"]["type"] == "area"
    loader.cancel_run(demo.job, "charted")


def test_what_a_link_loses_is_named_on_the_page_while_it_shows_that_run(page, demo, idle_queue):
    import json

    loader.start_run(demo.job, run_id="link-notes")
    page.query_params["job"] = demo.job
    page.query_params["run"] = "link-notes"
    page.query_params["filter"] = json.dumps({"index": {"type": "equals", "filter": "::JSCODE::x::JSCODE::"},
                                              "error_message": {"type": "contains", "filter": "kept"}})
    at = page.run()
    note = "The link's filter on column 'index' was dropped"

    def infos():
        return " ".join(plain(i.value) for i in at.info)

    assert note in infos()
    assert "kept" in page.query_params["filter"] and "JSCODE" not in page.query_params["filter"]
    at.run()  # a later run of the page (a click, a refresh) still says it
    assert note in infos()
    loader.cancel_run(demo.job, "link-notes")
    start_button(at).click().run()  # a new run on screen: the link's note has served its purpose
    assert not at.exception and note not in infos()
    loader.cancel_run(demo.job, loader.list_runs(demo.job)[0]["etl_run_id"])


def card(at, label: str) -> str:
    """The value of one metric card, as drawn (HTML-escaped text)."""
    import re

    cards = next(h.proto.body for h in at.get("html") if 'class="dl-cards"' in h.proto.body)
    found = re.search(f'<dt class="dl-l">{re.escape(label)}</dt><dd class="dl-v">([^<]*)</dd>', cards)
    assert found, f"no card {label!r} in {cards}"
    return found.group(1)


def test_elapsed_and_rows_per_second_count_loading_time_and_wall_time_is_shown_apart(page, demo, idle_queue):
    import time

    from loader import loading, planning
    from ui import format as fmt

    loader.start_run(demo.job, run_id="idle-gap", batch_size=500)  # 1050 rows: 3 batches; no worker listens
    planning.plan_run(demo.job, "idle-gap")
    for index in (0, 1):
        assert loading.load_batch(demo.job, "idle-gap", index).status == "succeeded"
    time.sleep(2.5)  # nothing loads: idle time, as before a retry
    assert loading.load_batch(demo.job, "idle-gap", 2).status == "succeeded"
    m = loader.run_contract(demo.job, "idle-gap")["metrics"]
    assert m["elapsed_ms"] > m["loading_ms"] + 2000
    page.query_params["job"] = demo.job
    page.query_params["run"] = "idle-gap"
    at = page.run()
    assert not at.exception
    assert card(at, "Elapsed") == fmt.fmt_ms(m["loading_ms"])
    assert card(at, "Wall time") == fmt.fmt_ms(m["elapsed_ms"])
    assert card(at, "Rows/s") == fmt.fmt_int(round(m["throughput_rps"]))
    # throughput is counted over the unrounded loading time; loading_ms is that time rounded to a whole ms
    rows = m["rows_attempted"] * 1000
    assert rows / (m["loading_ms"] + 0.5) - 0.05 <= m["throughput_rps"] <= rows / (m["loading_ms"] - 0.5) + 0.05


def test_a_run_that_fails_while_planning_gets_its_run_failed_toast(page, demo, workers, tmp_path, monkeypatch):
    """A worker plans at once and the missing source fails the run, often before the monitor's first read."""
    from ..helpers import write_catalog

    (tmp_path / "nosrc").mkdir()
    catalog = write_catalog(tmp_path / "nosrc", {"nosrc": {
        "source": "nowhere/*.ndjson", "target_table": "nosrc_stg.t", "source_id": "id"}})
    monkeypatch.setenv("ETL_JOBS_FILE", str(catalog))
    at = page.run()
    at.selectbox(key="cfg_job").select("nosrc").run()
    at.text_input(key="cfg_run_id").input(f"plan-fails-{tmp_path.name[-6:]}").run()
    start_button(at).click().run()
    toasts = [t.value for t in at.toast]
    loader.wait_for_run("nosrc", at.query_params["run"], timeout=30)
    at.run()  # the monitor's next tick, if the run was still queued when the page first read it
    assert not at.exception
    toasts += [t.value for t in at.toast]
    assert sum("Run failed" in t for t in toasts) == 1, toasts


def transient_forever(pg, table: str) -> None:
    """A target table whose trigger fails every insert with a serialization failure (transient)."""
    from psycopg import sql

    from ..helpers import create_target_table

    create_target_table(pg, table)
    schema, name = table.split(".")
    pg.execute(sql.SQL("CREATE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION "
                       "'could not serialize access' USING ERRCODE = '40001'; END $$").format(
                           sql.Identifier(schema, "always_busy")))
    pg.execute(sql.SQL("CREATE TRIGGER busy BEFORE INSERT ON {} FOR EACH ROW EXECUTE FUNCTION {}()").format(
        sql.Identifier(schema, name), sql.Identifier(schema, "always_busy")))


def test_a_batch_that_failed_for_good_after_transient_errors_never_reads_will_retry(
        demo, idle_queue, pg, target_schema, monkeypatch):
    from loader import browse, loading, planning
    from ui.attempt_timeline import timeline_html

    monkeypatch.setenv("ETL_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("ETL_RETRY_BASE_SECONDS", "0.01")
    transient_forever(pg, f"{target_schema}.items")
    loader.start_run(demo.job, run_id="gave-up", batch_size=5000)
    planning.plan_run(demo.job, "gave-up")
    assert loading.load_batch(demo.job, "gave-up", 0).status == "failed"
    row = browse.batch_page(demo.job, "gave-up", browse.BatchQuery(0, 10)).rows[0]  # the grid's row
    detail = browse.batch_detail(demo.job, "gave-up", 0)
    contract_row = loader.run_contract(demo.job, "gave-up")["batches"][0]
    for shown in (row, detail, contract_row):
        assert shown["status"] == "failed" and shown["attempts"] == 2
        assert "will retry" not in shown["error_message"]
        assert shown["error_message"].startswith("database error, failed for good after 2 attempt(s): ")
    table = timeline_html(detail["attempt_timeline"], "Europe/Paris")
    first, last = table.split("<tr>")[2:]  # header row, then one row per attempt
    assert "retrying" in first and "database error, will retry: " in first  # true for that attempt: one followed
    assert "database error, failed for good after 2 attempt(s): " in last and "will retry" not in last


def test_attempts_and_retried_n_are_the_same_number(demo, idle_queue, pg, target_schema, monkeypatch):
    """A batch waiting for its next attempt after n transient failures: Attempt(s) n, Status retried(n)."""
    import threading
    import time

    from loader import browse, loading, planning

    monkeypatch.setenv("ETL_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("ETL_RETRY_BASE_SECONDS", "6")  # the worker waits 3 to 6 s before attempt 2
    transient_forever(pg, f"{target_schema}.items")
    loader.start_run(demo.job, run_id="waits", batch_size=5000)
    planning.plan_run(demo.job, "waits")
    worker = threading.Thread(target=loading.load_batch, args=(demo.job, "waits", 0))
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while (row := browse.batch_page(demo.job, "waits", browse.BatchQuery(0, 10)).rows[0])["status"] != "retried":
            assert time.monotonic() < deadline, row
            time.sleep(0.05)
        assert (row["attempts"], row["status_label"]) == (1, "retried(1)")
        assert row["error_message"].startswith("database error, will retry: ")  # true: attempt 2 is due
    finally:
        worker.join()
