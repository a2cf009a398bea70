"""Every panel that shows run state follows the ledger through a live run, a retry and a cancel (Chromium)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import pytest
from playwright.sync_api import expect

from ..helpers import create_poisoned_target_table, remove_poison, write_catalog
from .panel_readers import PANELS_JS, ledger_batch, ledger_run, row_label, warning_words

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.usefixtures("ledger")]

#: Batches of the live run (100 records each).
BATCHES = 2000
#: Seconds a panel may disagree with the ledger before the test fails (generous: machine noise).
BOUND = 6.0
#: Seconds between two samples of every panel.
SAMPLE = 0.5

#: The batch the grid shows first (the page is opened with the grid filtered to index >= DETAIL) and whose
#: detail is open: it fails for good in the run, then succeeds in the retry.
DETAIL = 1500
GRID_FILTER = json.dumps({"index": {"filterType": "number", "type": "greaterThanOrEqual", "filter": DETAIL}})

def ledger_view(job: str, run: str) -> dict[str, Any]:
    """What the ledger says now, in the words each panel uses."""
    r, b = ledger_run(job, run), ledger_batch(job, run, DETAIL)
    return {"badge": r["badge"], "succeeded": r["succeeded"], "empty": r["empty"], "warning": r["warning"],
            "row0": b["row"], "recent": r["recent"], "detail": b["detail"], "chart": r["chart"]}


def shown(page_view: dict[str, Any]) -> dict[str, Any]:
    return {"badge": page_view["badge"], "succeeded": page_view["cards"].get("Batches succeeded"),
            "empty": page_view["empty"], "warning": warning_words(page_view["warning"]),
            "row0": row_label((page_view["rows"] or {}).get(str(DETAIL))),
            "recent": page_view["recent"], "detail": page_view["detail"], "chart": page_view["chart"]}


#: Panels that show a count, which only grows during a run.
COUNTS = ("succeeded", "chart")


def _count(text: str | None) -> int:
    return int(text.replace(",", "")) if text else 0


class Sampler:
    """Samples page and ledger every SAMPLE seconds; a panel fails when it shows, for longer than BOUND,
    a value the ledger has not held in the last BOUND seconds. Records each panel's lag."""

    def __init__(self, page, job: str, run: str) -> None:
        self.page, self.job, self.run = page, job, run
        self.history: list[tuple[float, dict[str, Any]]] = []
        self.since: dict[str, float] = {}
        self.lags: dict[str, list[float]] = {}
        self.failures: list[str] = []

    def watch(self, run: str) -> None:
        self.run = run
        self.history.clear()
        self.since.clear()

    def sample(self) -> None:
        now = time.monotonic()
        truth = ledger_view(self.job, self.run)
        self.history.append((now, truth))
        view = shown(self.page.evaluate(PANELS_JS, self.run))
        for panel, value in view.items():
            if panel in ("row0", "recent", "detail") and value is None:
                continue  # not drawn yet (the grid's row loading, the detail's batch not yet planned)
            if panel in COUNTS:  # a count: shown right when it reached what the ledger had BOUND s ago
                matches = [t for t, h in self.history if _count(h[panel]) >= _count(value)]
            else:
                matches = [t for t, h in self.history if h[panel] == value]
            if panel in COUNTS:
                window = [_count(h[panel]) for t, h in self.history if now - t >= BOUND]
                ok = value is not None and _count(value) >= (window[-1] if window else 0)
            else:
                ok = value == truth[panel] or bool(matches and now - matches[-1] <= BOUND)
            if ok:
                self.since.pop(panel, None)
                if value == truth[panel] or not matches:
                    self.lags.setdefault(panel, []).append(0.0)
                else:  # behind since the ledger left the shown value (the first sample after its last match)
                    later = [t for t, _ in self.history if t > matches[-1]]
                    self.lags.setdefault(panel, []).append(now - later[0] if later else 0.0)
                continue
            start = self.since.setdefault(panel, now)
            if now - start > BOUND:
                self.failures.append(f"{panel}: page {value!r}, ledger {truth[panel]!r} for {now - start:.1f} s")
                self.since[panel] = now  # one failure per episode

    def until(self, done: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "the run did not get there in time"
            self.sample()
            time.sleep(SAMPLE)
        for _ in range(int(BOUND / SAMPLE) + 4):  # and the panels settle on the final state
            self.sample()
            time.sleep(SAMPLE)


@pytest.fixture
def live_job(demo, tmp_path, monkeypatch, target_schema, pg):
    folder = tmp_path / "live"
    (folder / "data").mkdir(parents=True)
    with open(folder / "data" / "live.ndjson", "w") as f:
        f.writelines(f'{{"id": "r{i}", "customer": {{"id": {i % 7}}}}}\n' for i in range(BATCHES * 100))
    table = f"{target_schema}.live"
    create_poisoned_target_table(pg, table, "r150050")  # batch 1500 fails for good
    catalog = write_catalog(folder, {demo.job: {"description": "live", "source": "data/live.ndjson",
                                                "target_table": table, "source_id": "id"}})
    monkeypatch.setenv("ETL_JOBS_FILE", str(catalog))
    return demo.job, table


def test_every_panel_follows_the_ledger_through_a_live_run_a_retry_and_a_cancel(live_job, browser, workers, pg):
    import loader

    from .app_server import StreamlitServer
    from .conftest import ROOT

    job, table = live_job
    console = StreamlitServer("Home.py", ROOT, log_dir=ROOT / ".pytest_cache")
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 1600})

        def open_run(run: str) -> None:
            """The run's monitor, its grid filtered to index >= DETAIL, batch DETAIL's detail open."""
            page.goto(f"{console.url}/etl/data-loader?{urlencode({'job': job, 'run': run, 'filter': GRID_FILTER})}")
            page.locator(".stMarkdownBadge").first.wait_for(timeout=30_000)
            grid = page.frame_locator("iframe[title='st_aggrid.AgGrid.agGrid']")
            first = grid.locator(".ag-pinned-left-cols-container .ag-row[row-index='0'] [col-id='index']")
            expect(first).to_have_text(str(DETAIL), timeout=60_000)  # once the run is planned
            first.click()
            page.get_by_role("heading", name=f"Batch #{DETAIL}").wait_for(timeout=20_000)

        ref = loader.start_run(job, run_id="live-a", batch_size=100)
        open_run("live-a")
        sampler = Sampler(page, job, ref.etl_run_id)

        def final(run: str) -> Callable[[], bool]:
            return lambda: loader.run_status(job, run) in ("success", "partial_success", "failed", "canceled")

        from loader.contract import run_status

        loader.run_status = run_status  # type: ignore[attr-defined]
        sampler.until(final("live-a"), timeout=600)
        assert run_status(job, "live-a") == "partial_success"
        remove_poison(pg, table)
        loader.retry_run(job, "live-a")
        sampler.until(final("live-a"), timeout=120)
        assert run_status(job, "live-a") == "success"

        loader.start_run(job, run_id="live-b", batch_size=100)
        open_run("live-b")
        sampler.watch("live-b")
        deadline = time.monotonic() + 60
        while int(ledger_view(job, "live-b")["succeeded"].replace(",", "")) < 100:
            assert time.monotonic() < deadline
            sampler.sample()
            time.sleep(SAMPLE)
        loader.cancel_run(job, "live-b")
        sampler.until(final("live-b"), timeout=60)
        assert not sampler.failures, sampler.failures
        seen = {panel: len(v) for panel, v in sampler.lags.items()}
        assert all(seen.get(p, 0) >= 20 for p in ("badge", "succeeded", "empty", "warning", "row0", "recent",
                                                   "detail", "chart")), seen  # every panel was read, often
        p95 = {panel: round(sorted(v)[int(len(v) * 0.95)], 2) for panel, v in sampler.lags.items() if v}
        worst = {panel: round(max(v), 2) for panel, v in sampler.lags.items() if v}
        # The target is under 2 s; timed, at 10k and 100k batches: BENCHMARKS.md, "Console: each panel's lag".
        print("p95 lag (s) per panel:", p95, "max:", worst)
    finally:
        console.stop()
