"""The Run Monitor's panels on timers of their own (chart, batch detail) notice a change by themselves.

Each reads the run's change signature at its own tick. Before, they compared the signature the live
fragment had cached, so a change waited for the live fragment's tick and then for theirs: the duration
chart lagged 2.9 s at p95 behind the ledger (BENCHMARKS.md, "Console: each panel's lag").
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

import loader

pytestmark = pytest.mark.usefixtures("ledger")


def _panel_page(job: str, run: str, panel: str, stale: dict, stale_detail: object) -> None:
    """One panel drawn as its fragment draws it, the session holding what the live fragment read before the
    run's batches committed (and, for the detail, the batch as it was drawn then)."""
    import streamlit as st

    from ui.batch_detail import batch_detail
    from ui.run_cache import key
    from ui.run_charts import duration_charts

    st.session_state[key(job, run, "contract")] = stale
    st.session_state[key(job, run, "status")] = stale["status"]
    if stale_detail is not None:
        st.session_state[key(job, run, "detail")] = stale_detail
    if panel == "chart":
        duration_charts(job, run)
    else:
        batch_detail(job, run, 0)


def _finished_run_seen_while_queued(job: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A run loaded to the end, its contract now, and the contract as a tick saw it while it was queued."""
    ref = loader.start_run(job, batch_size=500)
    loader.wait_for_run(job, ref.etl_run_id, timeout=60)
    now = loader.run_contract(job, ref.etl_run_id, include_batches=False)
    stale = copy.deepcopy(now)
    stale.update(status="queued", _signature=(0, 0, 0, 0), _fetched=0.0)
    stale["metrics"].update(batches_succeeded=0, batches_total=0)
    return ref.etl_run_id, now, stale


def test_the_duration_chart_shows_committed_batches_the_live_fragment_has_not_read_yet(demo, workers):
    from streamlit.testing.v1 import AppTest

    run, now, stale = _finished_run_seen_while_queued(demo.job)
    at = AppTest.from_function(_panel_page, args=(demo.job, run, "chart", stale, None), default_timeout=30).run()
    assert not at.exception
    succeeded = now["metrics"]["batches_succeeded"]
    assert succeeded >= 2
    assert any(c.value.startswith(f"{succeeded} committed batches") for c in at.caption), [c.value for c in at.caption]


def test_the_batch_detail_reads_the_batch_again_when_the_run_moved_since_the_live_fragments_tick(demo, workers):
    from streamlit.testing.v1 import AppTest

    run, _now, stale = _finished_run_seen_while_queued(demo.job)
    # The detail drawn at that tick, kept under the signature the live fragment had cached then.
    pending = {"status": "pending", "status_label": "pending", "attempts": 0, "rows_attempted": 0, "first_line": 1,
               "line_count": 500, "source_file": "x", "error_message": None, "attempt_timeline": [],
               "error_stack": None, "logs_fragment": []}
    at = AppTest.from_function(_panel_page, args=(demo.job, run, "detail", stale, ((0, stale["_signature"]), pending)),
                               default_timeout=30).run()
    assert not at.exception
    lines = [t.value for t in at.text if t.value.startswith("Status: ")]
    assert lines and lines[0].startswith("Status: succeeded · attempts 1"), lines
