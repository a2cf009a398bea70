"""Sign-in behind an authenticating proxy (ETL_AUTH=proxy), in Chromium and over raw HTTP, against the real
console, PostgreSQL, Redis and workers: signed out, an outsider, a viewer, an operator, and a spoofed header."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import expect

import loader

from ..helpers import TcpRelay, create_poisoned_target_table, job_name, remove_poison, write_catalog
from .app_server import StreamlitServer
from .conftest import ROOT, Demo

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.usefixtures("ledger")]

HEADER = "X-Forwarded-Email"
OPERATOR = "ops@example.com"
VIEWER = "ana@example.com"
OUTSIDER = "eve@evil.org"
#: One viewer for the secret job: the operator. Ana may view the console, never this job.
SECRET_VIEWERS = [OPERATOR]


class Team:
    """The demo job and a secret one only the operator may view, behind ETL_AUTH=proxy."""

    def __init__(self, demo: Demo, folder: Path, target_schema: str) -> None:
        self.job = demo.job
        self.secret = job_name("secret")
        (folder / "data" / f"{self.secret}.ndjson").write_text('{"id": "s1"}\n')
        write_catalog(folder, {
            demo.job: {"description": "console demo", "source": f"data/{demo.job}.ndjson",
                       "target_table": f"{target_schema}.items", "source_id": "id", "required": ["customer.id"]},
            self.secret: {"description": "payroll", "source": f"data/{self.secret}.ndjson",
                          "target_table": f"{target_schema}.secret", "source_id": "id", "viewers": SECRET_VIEWERS},
        })


@pytest.fixture
def team(demo: Demo, tmp_path: Path, target_schema: str, monkeypatch: pytest.MonkeyPatch) -> Team:
    monkeypatch.setenv("ETL_AUTH", "proxy")
    monkeypatch.setenv("ETL_TRUSTED_PROXIES", "127.0.0.1/32")
    monkeypatch.setenv("ETL_VIEWERS", "@example.com")
    monkeypatch.setenv("ETL_OPERATORS", OPERATOR)
    return Team(demo, tmp_path, target_schema)


@pytest.fixture
def proxied(team: Team, workers) -> Iterator[StreamlitServer]:
    """The console under ETL_AUTH=proxy (the test plays the proxy: it sets the header, from 127.0.0.1)."""
    c = StreamlitServer("Home.py", ROOT, log_dir=ROOT / ".pytest_cache", log_name="console-proxy")
    try:
        yield c
    finally:
        c.stop()


def get(console: StreamlitServer, path: str, headers: dict[str, str] | list[tuple[str, str]] | None = None,
        source: str = "127.0.0.1") -> tuple[int, bytes]:
    """GET ``path`` from a socket bound to ``source`` (all of 127/8 reaches the console over loopback)."""
    conn = http.client.HTTPConnection("127.0.0.1", console.port, timeout=30, source_address=(source, 0))
    try:
        conn.putrequest("GET", path)
        pairs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        for name, value in pairs:
            conn.putheader(name, value)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def api(job: str, run: str, what: str) -> str:
    return f"/etl/data-loader/api/runs/{job}/{run}/{what}"


ROUTES = ("logs.ndjson", "metrics.csv", "rejects.ndjson", "batches?start=0&end=10", "batches/0", "version")


def as_person(browser, email: str | None):
    headers = {HEADER: email} if email else {}
    return browser.new_context(viewport={"width": 1280, "height": 1600}, extra_http_headers=headers).new_page()


def finished_run(job: str, run: str, actor: str = OPERATOR) -> None:
    ref = loader.start_run(job, run_id=run, batch_size=500, actor=actor)
    loader.wait_for_run(job, ref.etl_run_id, timeout=60)


def test_signed_out_the_page_says_sign_in_is_required_and_nothing_else_and_every_route_answers_401(
        proxied, team, browser):
    finished_run(team.job, "seen")
    page = as_person(browser, None)
    page.goto(f"{proxied.url}/etl/data-loader?job={team.job}&run=seen")
    page.get_by_role("heading", name="Sign-in required").wait_for(timeout=30_000)
    page.wait_for_timeout(1500)
    text = page.locator(".stApp").inner_text()
    assert team.job not in text and "seen" not in text and "Run Configuration" not in text
    assert page.get_by_role("link", name="Data Loader").count() == 0  # not even the navigation
    for what in ROUTES:
        status, data = get(proxied, api(team.job, "seen", what))
        assert (status, json.loads(data)) == (401, {"error": "sign-in required"}), what
    assert get(proxied, f"/etl/data-loader/{team.job}/seen")[0] == 401  # the deep link's redirect too


def test_an_outsider_is_told_they_may_not_view_and_every_route_answers_403(proxied, team, browser):
    finished_run(team.job, "seen")
    page = as_person(browser, OUTSIDER)
    page.goto(f"{proxied.url}/etl/data-loader")
    page.get_by_role("heading", name="Not allowed").wait_for(timeout=30_000)
    page.get_by_text(f"You are signed in as {OUTSIDER}, who may not view this console").wait_for()
    assert team.job not in page.locator(".stApp").inner_text()
    for what in ROUTES:
        assert get(proxied, api(team.job, "seen", what), {HEADER: OUTSIDER})[0] == 403, what


def test_a_viewer_sees_the_jobs_they_may_view_with_every_action_disabled_as_operators_only(proxied, team, browser):
    finished_run(team.job, "seen")
    finished_run(team.secret, "hidden")
    page = as_person(browser, VIEWER)
    page.goto(f"{proxied.url}/etl/data-loader/{team.job}/seen")
    page.locator(".stMarkdownBadge", has_text="Success").first.wait_for(timeout=30_000)
    page.get_by_text(f"Signed in as {VIEWER} (viewer)").wait_for()
    page.get_by_text(f"started by: {OPERATOR}").wait_for()
    expect(page.locator(".dl-history li")).to_have_count(1)
    assert f"{OPERATOR} · start (batch size 500)" in page.locator(".dl-history li").inner_text()
    # Every action disabled, the reason in the button's own name (what a screen reader reads with it).
    for name in ("Start Load (operators only)", "Retry failed batches (operators only)",
                 "Cancel run (operators only)"):
        expect(page.get_by_role("button", name=name)).to_be_disabled()
    page.get_by_text("Validation summary").click()
    rejects = page.get_by_role("link", name="Download rejected records (NDJSON) (operators only)")
    rejects.or_(page.get_by_role("button", name="Download rejected records (NDJSON) (operators only)")).wait_for()
    # The secret job is nowhere: not in the select, not in Recent runs, not behind a link.
    page.get_by_role("combobox", name="ETL Job").click()
    options = page.get_by_role("option").all_inner_texts()
    assert team.job in options and team.secret not in options
    page.keyboard.press("Escape")
    page.goto(f"{proxied.url}/etl/data-loader/{team.secret}/hidden")
    page.get_by_text(f"No run hidden for job {team.secret}").wait_for(timeout=30_000)
    page.goto(f"{proxied.url}/etl/runs")
    page.get_by_text("Recent runs").first.wait_for(timeout=30_000)
    cells = page.locator("[role=gridcell]")  # the table's cells (drawn on a canvas; kept in the DOM for readers)
    cells.filter(has_text="seen").first.wait_for(state="attached", timeout=30_000)
    listed = " ".join(cells.all_text_contents())
    assert team.job in listed and team.secret not in listed and "hidden" not in listed
    # The routes: what a viewer may read, and nothing of the secret job (its answer is an unknown run's).
    for what in ("logs.ndjson", "metrics.csv", "batches?start=0&end=10", "batches/0", "version"):
        assert get(proxied, api(team.job, "seen", what), {HEADER: VIEWER})[0] == 200, what
    status, data = get(proxied, api(team.job, "seen", "rejects.ndjson"), {HEADER: VIEWER})
    assert status == 403 and "operators only" in json.loads(data)["error"]
    unknown = get(proxied, api(team.job, "no-such-run", "logs.ndjson"), {HEADER: VIEWER})
    assert json.loads(unknown[1]) == {"error": f"no run 'no-such-run' for job '{team.job}'"}
    for what in ROUTES:
        status, data = get(proxied, api(team.secret, "hidden", what), {HEADER: VIEWER})
        assert (status, json.loads(data)) == (404, {"error": f"no run 'hidden' for job '{team.secret}'"}), what
    assert get(proxied, api(team.secret, "hidden", "logs.ndjson"), {HEADER: OPERATOR})[0] == 200


def test_an_operator_starts_retries_and_cancels_from_the_page_and_the_ledger_names_them(
        proxied, team, demo, browser, pg, target_schema, monkeypatch):
    from .test_browser import start_from_the_ui

    create_poisoned_target_table(pg, f"{target_schema}.items", "r250")
    page = as_person(browser, OPERATOR)
    run = start_from_the_ui(page, proxied, demo)
    page.get_by_text(f"Signed in as {OPERATOR} (operator)").wait_for(timeout=30_000)
    page.locator(".stMarkdownBadge", has_text="Partial success").first.wait_for(timeout=60_000)
    remove_poison(pg, f"{target_schema}.items")
    page.get_by_role("button", name="Retry failed batches", exact=True).click()
    page.get_by_role("dialog").get_by_role("button", name="Retry failed batches").click()
    page.get_by_role("dialog").wait_for(state="detached", timeout=30_000)  # answered: the retry is queued
    c = loader.wait_for_run(team.job, run, timeout=60)
    assert c["status"] == "success"
    assert c["started_by"] == OPERATOR
    assert [(a["actor"], a["action"]) for a in c["actions"]] == [(OPERATOR, "start"), (OPERATOR, "retry")]
    page.get_by_text(f"started by: {OPERATOR}").wait_for()
    expect(page.locator(".dl-history li")).to_have_count(2)
    # A run nobody will plan (queued where no worker listens), canceled from the page.
    monkeypatch.setenv("ETL_QUEUE", f"idle-{run[:8]}")
    loader.start_run(team.job, run_id="to-cancel", actor="cron")
    page.goto(f"{proxied.url}/etl/data-loader/{team.job}/to-cancel")
    page.get_by_role("button", name="Cancel run", exact=True).click()
    page.get_by_role("dialog").get_by_role("button", name="Cancel run").click()
    page.locator(".stMarkdownBadge", has_text="Canceled").first.wait_for(timeout=30_000)
    assert [(a["actor"], a["action"]) for a in loader.run_contract(team.job, "to-cancel")["actions"]] == [
        ("cron", "start"), (OPERATOR, "cancel")]
    # And the rejected records, which only operators may download.
    assert get(proxied, api(team.job, run, "rejects.ndjson"), {HEADER: OPERATOR})[0] == 200


def test_a_spoofed_identity_header_from_an_untrusted_peer_is_ignored_by_the_routes_and_the_page(
        proxied, team, browser):
    finished_run(team.job, "seen")
    logs = api(team.job, "seen", "logs.ndjson")
    assert get(proxied, logs, {HEADER: OPERATOR})[0] == 200  # from the trusted proxy's address
    status, data = get(proxied, logs, {HEADER: OPERATOR}, source="127.0.0.2")
    assert (status, json.loads(data)) == (401, {"error": "sign-in required"})
    # X-Forwarded-For does not make an untrusted peer trusted, nor a trusted one untrusted.
    assert get(proxied, logs, {HEADER: OPERATOR, "X-Forwarded-For": "127.0.0.1"}, source="127.0.0.2")[0] == 401
    assert get(proxied, logs, {HEADER: OPERATOR, "X-Forwarded-For": "203.0.113.7"})[0] == 200
    # A client's own header beside the proxy's: two values identify nobody.
    assert get(proxied, logs, [(HEADER, VIEWER), (HEADER, OPERATOR)])[0] == 401
    # The page's websocket session from the untrusted peer, header and all: signed out.
    # The browser's requests, its websocket included, reach the console from 127.0.0.2, a peer that
    # ETL_TRUSTED_PROXIES (127.0.0.1/32) does not name.
    relay = TcpRelay(("127.0.0.1", proxied.port), source="127.0.0.2")
    try:
        page = as_person(browser, OPERATOR)
        page.goto(f"http://127.0.0.1:{relay.port}/etl/data-loader?job={team.job}&run=seen")
        page.get_by_role("heading", name="Sign-in required").wait_for(timeout=30_000)
        assert team.job not in page.locator(".stApp").inner_text()
    finally:
        relay.close()
    # The same browser through the trusted address is the operator.
    page = as_person(browser, OPERATOR)
    page.goto(f"{proxied.url}/etl/data-loader")
    page.get_by_text(f"Signed in as {OPERATOR} (operator)").wait_for(timeout=30_000)
    assert urlsplit(proxied.url).hostname == "127.0.0.1"


def test_without_sign_in_the_page_says_anyone_can_act_and_records_its_actions_as_anonymous(console, demo, browser):
    from .test_browser import start_from_the_ui

    page = browser.new_page(viewport={"width": 1280, "height": 1600})
    run = start_from_the_ui(page, console, demo)
    page.get_by_text("No sign-in (ETL_AUTH=none): anyone who can reach this console can start, retry and cancel "
                     "runs").wait_for()
    page.get_by_text("started by: anonymous").wait_for(timeout=30_000)
    assert loader.run_contract(demo.job, run)["started_by"] == "anonymous"
    page.goto(f"{console.url}/etl/runs")  # the note is on every page
    page.get_by_text("No sign-in (ETL_AUTH=none)").wait_for(timeout=30_000)


def _batch_detail_page(job: str, run: str, index: int, stale_operator: str | None) -> None:
    """The selected batch's detail as the Run Monitor draws it for a run that may be retried; with
    ``stale_operator``, the page still holds the operator it admitted earlier (the roles changed since)."""
    import streamlit as st

    from ui.batch_detail import batch_detail
    from ui.identity import Person, rules
    from ui.run_cache import key

    if stale_operator:
        st.session_state["dl_person"] = Person(stale_operator, rules())
    st.session_state[key(job, run, "status")] = "partial_success"
    batch_detail(job, run, index)


def test_retry_this_batch_is_for_operators_only_and_checked_again_at_the_click(team, demo, workers, pg,
                                                                                 target_schema):
    """Under proxy, a session without an operator's identity sees "Retry this batch (operators only)" disabled;
    a click that reaches the server anyway (here: a page that admitted an operator before the roles changed)
    is refused there: nothing queued, nothing recorded."""
    from streamlit.testing.v1 import AppTest

    create_poisoned_target_table(pg, f"{target_schema}.items", "r250")
    ref = loader.start_run(team.job, batch_size=500, actor=OPERATOR)
    c = loader.wait_for_run(team.job, ref.etl_run_id, timeout=60)
    [failed] = [b["index"] for b in c["batches"] if b["status"] == "failed"]
    at = AppTest.from_function(_batch_detail_page, args=(team.job, ref.etl_run_id, failed, None), default_timeout=30)
    at.run()
    [button] = [b for b in at.button if b.label.startswith("Retry this batch")]
    assert button.label == "Retry this batch (operators only)" and button.disabled
    at = AppTest.from_function(_batch_detail_page, args=(team.job, ref.etl_run_id, failed, OPERATOR),
                               default_timeout=30)
    at.run()
    [button] = [b for b in at.button if b.label.startswith("Retry this batch")]
    assert button.label == "Retry this batch" and not button.disabled
    at = button.click().run()
    assert not at.exception
    assert any("operators only" in m.value for m in at.markdown) or any(
        "operators only" in getattr(e, "body", "") for e in at.get("html"))
    after = loader.run_contract(team.job, ref.etl_run_id)
    assert after["status"] == "partial_success" and [a["action"] for a in after["actions"]] == ["start"]
