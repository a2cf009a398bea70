"""The console's HTTP routes (deep links, grid pages, downloads), called without a server."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
from urllib.parse import urlencode

import pytest
from starlette.requests import Request

import loader
from loader.browse import AllOf, AnyOf, BatchQuery, Condition, Sort
from loader.errors import ConfigError
from ui.grid_query import parse_query
from ui.routes import routes

pytestmark = pytest.mark.usefixtures("ledger")


def call(path: str, query: dict | None = None, headers: dict[str, str] | None = None):
    """Route ``path`` like Starlette would and call its endpoint; returns the response."""
    scope = {"type": "http", "method": "GET", "path": path, "query_string": urlencode(query or {}).encode(),
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
    for route in routes():
        match, child = route.matches(scope)
        if match.name == "FULL":
            return route.endpoint(Request({**scope, **child}))
    raise AssertionError(f"no route for {path}")


def body(response) -> bytes:
    if hasattr(response, "body_iterator"):
        async def collect() -> bytes:
            return b"".join([c if isinstance(c, bytes) else c.encode() async for c in response.body_iterator])
        return asyncio.run(collect())
    return response.body


@pytest.fixture(scope="module")
def finished(tmp_path_factory, ledger, workers):
    """A finished run of 1050 records in batches of 100 (11 batches)."""
    from psycopg import sql

    from ..helpers import job_name, write_catalog, write_ndjson

    folder = tmp_path_factory.mktemp("routes")
    job = job_name("routes")
    schema = f"stg_{job.split('-')[1]}"
    write_ndjson(folder / "data.ndjson", [{"id": f"r{i}"} for i in range(1050)])
    catalog = write_catalog(folder, {job: {"source": "data.ndjson", "target_table": f"{schema}.items",
                                           "source_id": "id"}})
    ref = loader.start_run(job, catalog=catalog, batch_size=100, run_id="routes-run")
    loader.wait_for_run(job, ref.etl_run_id, timeout=60)
    yield job, ref.etl_run_id
    import os

    import psycopg
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def test_deep_link_redirects_to_the_page_with_job_and_run_in_the_query():
    r = call("/etl/data-loader/orders/2026-11-27")
    assert r.status_code == 307 and r.headers["location"] == "/etl/data-loader?job=orders&run=2026-11-27"


def test_deep_link_route_never_answers_streamlit_paths():
    assert call("/etl/data-loader/_stcore/health").status_code == 404
    assert call("/etl/data-loader/orders/x/_stcore/health").status_code == 404
    assert call("/etl/data-loader/api/runs/orders").status_code == 404


@pytest.mark.parametrize("path, query", [
    ("/etl/data-loader/orders", "job=orders"),
    ("/etl/data-loader/orders/a/b", "job=orders&run=a%2Fb"),
    ("/etl/data-loader/orders/<script>x</script>", "job=orders&run=%3Cscript%3Ex%3C%2Fscript%3E"),
])
def test_other_paths_below_the_page_go_to_the_page_which_says_what_is_wrong(path, query):
    """Streamlit would serve a blank page for them."""
    r = call(path)
    assert r.status_code == 307 and r.headers["location"] == f"/etl/data-loader?{query}"


def test_root_redirects_to_the_console():
    assert call("/").headers["location"] == "/etl/data-loader"


def test_batches_page_is_sorted_and_filtered_in_sql(finished):
    job, run = finished
    sort = json.dumps([{"colId": "rows_attempted", "sort": "asc"}])
    r = call(f"/etl/data-loader/api/runs/{job}/{run}/batches", {"start": 0, "end": 3, "sort": sort})
    data = json.loads(body(r))
    assert data["lastRow"] == 11
    assert [row["index"] for row in data["rows"]] == [10, 0, 1]  # the 50-row batch first, then by index
    flt = json.dumps({"index": {"filterType": "number", "type": "greaterThanOrEqual", "filter": 9}})
    data = json.loads(body(call(f"/etl/data-loader/api/runs/{job}/{run}/batches", {"filter": flt})))
    assert [row["index"] for row in data["rows"]] == [9, 10] and data["lastRow"] == 2
    data = json.loads(body(call(f"/etl/data-loader/api/runs/{job}/{run}/batches", {"status": "failed"})))
    assert data == {**data, "rows": [], "lastRow": 0}


@pytest.mark.parametrize("query", [
    {"sort": json.dumps([{"colId": "etl_job_id; DROP TABLE runs", "sort": "asc"}])},
    {"filter": json.dumps({"error_message": {"filterType": "text", "type": "regex", "filter": ".*"}})},
    {"filter": "{not json"},
    {"sort": "5"},
    {"filter": "[1]"},
    {"start": "-1"},
    {"start": 0, "end": 100000},
    {"status": "exploded"},
    {"sort": "[" * 1500 + "]" * 1500},
    {"sort": json.dumps([{"colId": ["index"], "sort": "asc"}])},
    {"filter": json.dumps({"index": {"conditions": 5}})},
    {"filter": json.dumps({"index": {"type": ["equals"], "filter": 1}})},
    {"filter": json.dumps({"index": {"type": "equals", "filter": 10**30}})},
    {"filter": json.dumps({"error_message": {"type": "contains", "filter": "a\u0000b"}})},
    {"start": 10**20, "end": 10**20 + 10},
])
def test_batches_page_refuses_bad_parameters_with_400(finished, query):
    job, run = finished
    r = call(f"/etl/data-loader/api/runs/{job}/{run}/batches", query)
    assert r.status_code == 400 and "error" in json.loads(r.body)


def test_unknown_run_is_404_and_bad_run_id_is_400(finished):
    job, _ = finished
    assert call(f"/etl/data-loader/api/runs/{job}/no-such-run/version").status_code == 404
    assert call(f"/etl/data-loader/api/runs/{job}/Bad Run/version").status_code == 400


def test_version_and_batch_detail(finished):
    job, run = finished
    token = json.loads(call(f"/etl/data-loader/api/runs/{job}/{run}/version").body)["version"]
    page = json.loads(body(call(f"/etl/data-loader/api/runs/{job}/{run}/batches", {"start": 0, "end": 5})))
    assert token and page["version"] == token  # the grid refreshes when they differ
    detail = json.loads(call(f"/etl/data-loader/api/runs/{job}/{run}/batches/3").body)
    assert detail["index"] == 3 and detail["attempt_timeline"][0]["status"] == "succeeded"
    assert call(f"/etl/data-loader/api/runs/{job}/{run}/batches/99").status_code == 404
    assert call(f"/etl/data-loader/api/runs/{job}/{run}/batches/99999999999999999999").status_code == 404


def test_downloads_stream_logs_and_metrics_as_attachments(finished):
    job, run = finished
    logs = call(f"/etl/data-loader/api/runs/{job}/{run}/logs.ndjson")
    assert logs.headers["content-disposition"].startswith("attachment")
    events = [json.loads(line) for line in body(logs).splitlines()]
    assert sum(e["event"] == "batch_committed" for e in events) == 11
    rows = list(csv.DictReader(io.StringIO(body(call(f"/etl/data-loader/api/runs/{job}/{run}/metrics.csv")).decode())))
    assert len([r for r in rows if r["row_type"] == "batch"]) == 11
    assert next(r for r in rows if r["row_type"] == "run")["rows_inserted"] == "1050"
    assert call(f"/etl/data-loader/api/runs/{job}/nope/metrics.csv").status_code == 404


def test_parse_query_accepts_only_whitelisted_columns():
    query = parse_query(0, 10, [{"colId": "duration_ms", "sort": "desc"}])
    assert query.sort == (Sort("duration_ms", descending=True),)
    with pytest.raises(ConfigError):
        parse_query(0, 10, [{"colId": "payload", "sort": "asc"}])
    with pytest.raises(ConfigError):
        parse_query(filters={"committed_at": {"type": "equals", "filter": 1}})


def test_ag_grid_filter_models_become_the_engines_conditions():
    query = parse_query(0, 100, filters={
        "duration_ms": {"filterType": "number", "type": "inRange", "filter": 10, "filterTo": 500},
        "error_message": {"filterType": "text", "operator": "OR", "conditions": [
            {"filterType": "text", "type": "contains", "filter": "timeout"},
            {"filterType": "text", "type": "blank"}]},
        "attempts": {"operator": "AND", "conditions": [{"type": "greaterThan", "filter": 1},
                                                       {"type": "notEqual", "filter": 3}]},
    }, statuses="failed,retried")
    assert query == BatchQuery(0, 100, (), (
        Condition("duration_ms", "between", 10, 500),
        AnyOf((Condition("error_message", "contains", "timeout"), Condition("error_message", "blank"))),
        AllOf((Condition("attempts", "gt", 1), Condition("attempts", "ne", 3))),
    ), ("failed", "retried"))


@pytest.mark.parametrize("build", [
    lambda: Condition("duration_ms", "contains", "x"),  # a text operator on a number column
    lambda: Condition("error_code", "between", "a"),  # a number operator on a text column
    lambda: Condition("attempts", "gt", 2**31),  # beyond PostgreSQL's integer
    lambda: Condition("error_message", "eq", "x" * 201),
    lambda: Condition("committed_at", "blank"),
    lambda: BatchQuery(0, 501),
    lambda: BatchQuery(sort=(Sort("payload"),)),
    lambda: BatchQuery(statuses=("bogus",)),
])
def test_the_engine_refuses_a_batch_query_it_cannot_run_in_its_own_terms(build):
    with pytest.raises(ConfigError):
        build()


@pytest.fixture
def no_read_timeout_after():
    """Tests that set the console's statement timeout leave the test process without one."""
    from loader import db

    yield
    db.set_read_timeout(None)


def test_a_data_request_beyond_the_limit_answers_503_with_retry_after_at_once(finished, monkeypatch):
    """ETL_CONSOLE_MAX_REQUESTS data requests at once; one more is refused, never queued."""
    from ui.routes import limiter

    job, run = finished
    monkeypatch.setenv("ETL_CONSOLE_MAX_REQUESTS", "2")
    held = [limiter().enter(), limiter().enter()]
    try:
        for path in ("batches", "batches/3", "logs.ndjson", "metrics.csv", "rejects.ndjson"):
            busy = call(f"/etl/data-loader/api/runs/{job}/{run}/{path}")
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1", path
            assert json.loads(busy.body)["error"].startswith("the console is busy: 2 data requests are running")
        assert call(f"/etl/data-loader/api/runs/{job}/{run}/version").status_code == 200  # cheap: never limited
    finally:
        held.pop()()
    assert call(f"/etl/data-loader/api/runs/{job}/{run}/batches", {"start": 0, "end": 10}).status_code == 200
    held.pop()()


def test_an_open_download_holds_a_stream_slot_but_no_data_slot_while_its_client_reads(finished, monkeypatch):
    job, run = finished
    monkeypatch.setenv("ETL_CONSOLE_MAX_REQUESTS", "1")
    download = call(f"/etl/data-loader/api/runs/{job}/{run}/logs.ndjson")
    assert download.status_code == 200
    second = call(f"/etl/data-loader/api/runs/{job}/{run}/metrics.csv")
    assert second.status_code == 503 and "downloads are being streamed" in json.loads(second.body)["error"]
    assert call(f"/etl/data-loader/api/runs/{job}/{run}/batches", {"start": 0, "end": 10}).status_code == 200
    assert sum(json.loads(line)["event"] == "batch_committed" for line in body(download).splitlines()) == 11
    assert call(f"/etl/data-loader/api/runs/{job}/{run}/metrics.csv").status_code == 200  # the slot came back


def test_a_refused_or_failed_data_request_gives_its_slot_back(finished, monkeypatch):
    job, _ = finished
    monkeypatch.setenv("ETL_CONSOLE_MAX_REQUESTS", "1")
    assert call(f"/etl/data-loader/api/runs/{job}/no-such-run/logs.ndjson").status_code == 404
    assert call(f"/etl/data-loader/api/runs/{job}/no-such-run/batches").status_code == 404
    assert call(f"/etl/data-loader/api/runs/{job}/no-such-run/batches").status_code == 404


def test_a_query_canceled_by_the_statement_timeout_answers_503_with_a_clear_message_not_500(
        finished, monkeypatch, pg, no_read_timeout_after):
    """The grid page and the download wait for a lock longer than the timeout: PostgreSQL cancels them."""
    import psycopg
    from psycopg import sql

    from ui.routes import configure_process

    job, run = finished
    monkeypatch.setenv("ETL_CONSOLE_STATEMENT_TIMEOUT", "0.3")
    configure_process()
    schema = os.environ["ETL_LEDGER_SCHEMA"]
    with psycopg.connect(os.environ["DATABASE_URL"]) as locker:
        locker.execute(sql.SQL("LOCK TABLE {}, {} IN ACCESS EXCLUSIVE MODE").format(
            sql.Identifier(schema, "batches"), sql.Identifier(schema, "events")))
        for path in ("batches", "batches/3", "logs.ndjson", "metrics.csv"):
            r = call(f"/etl/data-loader/api/runs/{job}/{run}/{path}")
            assert r.status_code == 503, (path, r.status_code, r.body)
            assert "did not answer within 0.3 s" in json.loads(r.body)["error"]
            assert r.headers["retry-after"] == "1"
        locker.rollback()
    assert call(f"/etl/data-loader/api/runs/{job}/{run}/batches").status_code == 200


def test_a_download_read_slowly_holds_no_pooled_connection_and_no_open_transaction(finished, monkeypatch, pg):
    """Downloads page by key on a connection of their own: between two pages it sits idle, outside any
    transaction, and Start, Retry and Cancel's pool does not lend it."""
    from loader import exports
    from ui import routes as ui_routes

    job, run = finished
    monkeypatch.setattr(exports, "FETCH_ROWS", 5)
    monkeypatch.setattr(ui_routes, "STREAM_CHUNK", 1)
    download = call(f"/etl/data-loader/api/runs/{job}/{run}/logs.ndjson")

    async def read_slowly() -> tuple[list[tuple[str, object]], bytes]:
        stream = download.body_iterator
        got = [await stream.__anext__(), await stream.__anext__()]
        # Mid-stream, the client pausing: the download's connection waits idle, outside any transaction.
        states = pg.execute("SELECT state, xact_start FROM pg_stat_activity WHERE application_name = "
                            "'dataloader-stream' AND datname = current_database()").fetchall()
        return states, b"".join(got + [chunk async for chunk in stream])

    states, data = asyncio.run(read_slowly())
    assert states == [("idle", None)]
    events = [json.loads(line) for line in data.splitlines()]
    assert sum(e["event"] == "batch_committed" for e in events) == 11
    assert len({json.dumps(e, sort_keys=True) for e in events}) == len(events)  # no page read twice
    assert pg.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dataloader-stream'"
                      ).fetchone() == (0,)


def test_a_grid_page_counts_its_rows_only_when_it_is_the_first_or_reaches_the_end(finished):
    """AG Grid keeps the count of the first page; a later full page says ``lastRow: null`` (not the end)."""
    job, run = finished
    url = f"/etl/data-loader/api/runs/{job}/{run}/batches"
    assert json.loads(body(call(url, {"start": 0, "end": 4})))["lastRow"] == 11
    middle = json.loads(body(call(url, {"start": 4, "end": 8})))
    assert middle["lastRow"] is None and [r["index"] for r in middle["rows"]] == [4, 5, 6, 7]
    assert json.loads(body(call(url, {"start": 8, "end": 11})))["lastRow"] == 11  # exactly at the end
    assert json.loads(body(call(url, {"start": 8, "end": 12})))["lastRow"] == 11
    assert json.loads(body(call(url, {"start": 20, "end": 30})))["lastRow"] == 11  # past the end: counted
    sort = json.dumps([{"colId": "rows_attempted", "sort": "desc"}, {"colId": "index", "sort": "desc"}])
    page = json.loads(body(call(url, {"start": 8, "end": 11, "sort": sort})))
    assert [r["index"] for r in page["rows"]] == [1, 0, 10] and page["lastRow"] == 11


def sse(raw: bytes) -> list[dict]:
    """The events of a text/event-stream body: [{"id", "event", "data"}] (comments and retry left out)."""
    events = []
    for block in raw.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":")
                      and ": " in line)
        if "event" in fields:
            events.append({"id": int(fields["id"]), "event": fields["event"], "data": json.loads(fields["data"])})
    return events


def test_the_event_stream_of_a_finished_run_sends_its_final_state_and_ends(finished):
    job, run = finished
    r = call(f"/etl/data-loader/api/runs/{job}/{run}/events")
    assert r.status_code == 200 and r.media_type == "text/event-stream" and r.headers["cache-control"] == "no-store"
    raw = body(r)
    assert raw.startswith(b"retry: ")
    [event] = sse(raw)
    assert event["event"] == "run" and event["data"]["status"] == "success"
    assert event["data"]["metrics"]["rows_inserted"] == 1050 and "batches" not in event["data"]
    # Resuming from the start: every batch, then the run.
    events = sse(body(call(f"/etl/data-loader/api/runs/{job}/{run}/events", headers={"Last-Event-ID": "0"})))
    assert sorted(e["data"]["index"] for e in events if e["event"] == "batch") == list(range(11))  # in change order
    assert events[-1]["event"] == "run" and events[-1]["id"] >= max(e["id"] for e in events)
    # A Last-Event-ID that is not a change number starts from now.
    junk = sse(body(call(f"/etl/data-loader/api/runs/{job}/{run}/events", headers={"Last-Event-ID": "<x>"})))
    assert [e["event"] for e in junk] == ["run"]


def test_the_event_stream_of_an_unknown_run_is_404_and_of_a_bad_id_400(finished):
    job, _ = finished
    assert call(f"/etl/data-loader/api/runs/{job}/no-such-run/events").status_code == 404
    assert call(f"/etl/data-loader/api/runs/{job}/Bad Run/events").status_code == 400


def test_event_streams_beyond_the_limit_answer_503(finished, monkeypatch):
    from ui import run_feed

    job, run = finished
    monkeypatch.setenv("ETL_CONSOLE_MAX_STREAMS", "1")
    assert run_feed.open_stream()  # one stream open
    try:
        r = call(f"/etl/data-loader/api/runs/{job}/{run}/events")
        assert r.status_code == 503 and "ETL_CONSOLE_MAX_STREAMS" in json.loads(r.body)["error"]
    finally:
        run_feed.close_stream()
    assert call(f"/etl/data-loader/api/runs/{job}/{run}/events").status_code == 200
