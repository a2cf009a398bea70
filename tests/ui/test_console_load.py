"""The console under load, in Chromium: Start and Cancel still complete while expensive requests storm it.

A synthetic run of 100,000 batches (``bench/seed_ledger.py``) is what the storm asks for; the run that
is started and canceled from the page is the demo job's, on a queue no worker listens to (so it stays
in progress until canceled). ``bench/console.py --storm`` times Start and Cancel under the same storm.
"""

from __future__ import annotations

import collections
import json
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.usefixtures("ledger")]

ROOT = Path(__file__).resolve().parents[2]

#: The most expensive grid request: sorted on a column no index serves, filtered by a text test that
#: every batch passes (so the sort takes all of them), at the first page (which counts) or deep down.
EXPENSIVE_SORT = json.dumps([{"colId": "duration_ms", "sort": "desc"}, {"colId": "error_message", "sort": "desc"}])
EXPENSIVE_FILTER = json.dumps({"error_message": {"filterType": "text", "type": "notContains", "filter": "zzz"}})


class Storm:
    """``pages`` threads asking for the most expensive grid page and ``downloads`` threads reading the run's
    logs.ndjson slowly, each again and again, until :meth:`stop`.

    ``statuses`` counts answers by kind and HTTP status (``("batches", 503)``); a broken connection or an
    incomplete download counts as status ``"broken"``. A refused request is asked again after ``pause``
    seconds (a grid asks again after its next version poll, 1 s).

    Example::

        storm = Storm(console.url, job, run, total=100_000)
        storm.start()
        ...
        counts = storm.stop()
    """

    def __init__(self, base_url: str, job: str, run: str, *, total: int, pages: int = 20, downloads: int = 5,
                 read_bytes: int = 16_384, read_pause: float = 0.05, pause: float = 0.2) -> None:
        api = f"{base_url}/etl/data-loader/api/runs/{quote(job, safe='')}/{quote(run, safe='')}"
        self.batches_url = f"{api}/batches"
        self.logs_url = f"{api}/logs.ndjson"
        self.total = total
        self.read_bytes, self.read_pause, self.pause = read_bytes, read_pause, pause
        self.statuses: collections.Counter[tuple[str, int | str]] = collections.Counter()
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._pages, args=(i,), daemon=True) for i in range(pages)]
        self._threads += [threading.Thread(target=self._downloads, daemon=True) for _ in range(downloads)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> collections.Counter[tuple[str, int | str]]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
        return self.statuses

    def _count(self, kind: str, status: int | str, error: str | None = None) -> None:
        with self._lock:
            self.statuses[(kind, status)] += 1
            if error is not None and len(self.errors) < 20:
                self.errors.append(f"{kind} {status}: {error}")

    def _pages(self, i: int) -> None:
        rng = random.Random(i)
        while not self._stop.is_set():
            start = 0 if rng.random() < 0.5 else rng.randrange(0, self.total - 100)
            query = urlencode({"start": start, "end": start + 100, "sort": EXPENSIVE_SORT,
                               "filter": EXPENSIVE_FILTER})
            status = self._get(f"{self.batches_url}?{query}", "batches")
            if status != 200:
                self._stop.wait(self.pause)

    def _downloads(self) -> None:
        while not self._stop.is_set():
            if self._get(self.logs_url, "logs", slowly=True) != 200:
                self._stop.wait(self.pause)

    def _get(self, url: str, kind: str, slowly: bool = False) -> int | str:
        try:
            with urllib.request.urlopen(url, timeout=120) as r:
                status = r.status
                while r.read(self.read_bytes if slowly else -1):
                    if self._stop.is_set():
                        break
                    if slowly:
                        time.sleep(self.read_pause)
        except urllib.error.HTTPError as exc:
            status = exc.code
            body = exc.read().decode(errors="replace")
            try:
                said = json.loads(body).get("error")
            except ValueError:
                said = None
            if status != 503 or not said:  # a refusal says why, as JSON
                self._count(kind, f"{status} without a JSON error" if status == 503 else status, body[:300])
                return status
        except OSError as exc:  # refused, reset, incomplete read: the console broke the request
            self._count(kind, "broken", repr(exc)[:300])
            return "broken"
        self._count(kind, status)
        return status


@pytest.fixture
def big_run(ledger: str):
    """A synthetic run of 100,000 batches in 'loading' (about 58k log events), deleted afterwards."""
    sys.path.insert(0, str(ROOT / "bench"))
    import seed_ledger
    from psycopg import sql

    from loader import db

    from ..helpers import job_name

    job, run = job_name("storm"), "storm-100k"
    seed_ledger.seed(job, run, 100_000)
    yield job, run
    with db.connection() as conn:
        for table in ("events", "attempts", "rejects", "batches", "runs"):
            conn.execute(sql.SQL("DELETE FROM {} WHERE etl_job_id = %s").format(db.ledger_table(table)), [job])


def test_start_and_cancel_complete_while_twenty_expensive_grid_requests_and_five_downloads_run(
        idle_queue, big_run, console, demo, browser):
    """No request starves the console: the storm is served (200) or refused at once (503 with a message),
    never a 500, and a Start and a Cancel from the page complete while it runs."""
    from loader.contract import run_status

    from .test_browser import start_from_the_ui

    job, run = big_run
    storm = Storm(console.url, job, run, total=100_000)
    storm.start()
    try:
        time.sleep(2)  # the storm is under way before the page asks for anything
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        run_id = start_from_the_ui(page, console, demo)
        page.get_by_text(f"etl_run_id: {run_id}").wait_for(timeout=60_000)
        page.locator(".stMarkdownBadge", has_text="Queued").first.wait_for(timeout=60_000)

        page.get_by_role("button", name="Cancel run").click()
        page.get_by_role("dialog").get_by_role("button", name="Cancel run").click()
        page.locator(".stMarkdownBadge", has_text="Canceled").first.wait_for(timeout=60_000)
        assert run_status(demo.job, run_id) == "canceled"
    finally:
        counts = storm.stop()
    assert {status for _, status in counts} <= {200, 503}, (dict(counts), storm.errors)
    assert counts[("batches", 200)] > 0 and counts[("logs", 200)] + counts[("logs", 503)] > 0, dict(counts)


def test_the_console_server_runs_its_reads_under_the_statement_timeout(demo, workers, pg):
    """Home.py turns ETL_CONSOLE_STATEMENT_TIMEOUT on for the console's own reads: a grid page that
    waits on a lock longer than that answers 503 with the reason, then works once the lock is gone."""
    import os

    import psycopg
    from psycopg import sql

    import loader

    from .app_server import StreamlitServer

    loader.start_run(demo.job, run_id="read-timeout", batch_size=500)
    assert loader.wait_for_run(demo.job, "read-timeout", timeout=60)["status"] == "success"
    server = StreamlitServer("Home.py", ROOT, log_dir=ROOT / ".pytest_cache",
                             env={**os.environ, "ETL_CONSOLE_STATEMENT_TIMEOUT": "0.5"})
    page = f"{server.url}/etl/data-loader/api/runs/{demo.job}/read-timeout/batches"
    try:
        with psycopg.connect(os.environ["DATABASE_URL"]) as locker:
            locker.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
                sql.Identifier(os.environ["ETL_LEDGER_SCHEMA"], "batches")))
            try:
                urllib.request.urlopen(page, timeout=30)
                raise AssertionError("a grid page answered while the batches were locked")
            except urllib.error.HTTPError as exc:
                assert exc.code == 503
                assert "did not answer within 0.5 s" in json.loads(exc.read())["error"]
            locker.rollback()
        with urllib.request.urlopen(page, timeout=30) as r:
            assert r.status == 200 and json.loads(r.read())["lastRow"] == 3
    finally:
        server.stop()
