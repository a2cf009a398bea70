"""The Run Monitor: lays out the panels of one run and decides which of them follow the run, and how often."""

from __future__ import annotations

from typing import Any

import streamlit as st

import loader

from . import format as fmt
from .batch_detail import batch_detail
from .batches_panel import batches_panel
from .run_actions import actions
from .run_cache import cached, key, load
from .run_charts import duration_charts
from .run_header import cards, header, history, live_region
from .run_toasts import show_toasts
from .text import alert, md_code
from .validation_summary import validation_summary

#: Seconds between two refreshes of every panel that shows run state: the live fragment (header, cards,
#: validation summary, "No batches yet"), the selected batch's detail, the duration chart, and on the left
#: the run-in-progress warning and Recent runs (also the Recent runs page). The target is a change on
#: screen within 2 s at p95 (BENCHMARKS.md, "Console: each panel's lag"): the timer alone waits 0.95 of
#: its period at p95, so 1 s leaves a second for the query and the render on a loaded machine, where
#: 1.5 s left half of one. One period for all: no panel trails another by a longer timer. An idle tick
#: reads one index-only statement per panel (``change_signature``; the warning's ``active_run`` lookup),
#: and Recent runs its list; an open monitor costs the server about 1.5 x the CPU it did with 1.5 s and
#: 2 s timers (44 ms a second instead of 29 ms, BENCHMARKS.md).
REFRESH_SECONDS = 1.0


def _live(job: str, run: str) -> None:
    """Everything that follows the run: refreshed every REFRESH_SECONDS by the fragment."""
    try:
        c, stale = load(job, run)
    except loader.RunNotFound:
        _not_found(job, run)
        return
    rerun_page = show_toasts(job, run, c, stale)
    if c is None:
        alert(stale or "No data yet", "warning")
        st.badge("Stale", icon=":material/cloud_off:", color="orange")
        return
    header(c, stale, REFRESH_SECONDS)
    history(c)
    cards(c)
    if rerun_page:
        # The run ended or was retried: the badge and the cards show it now, the rest of the page follows
        # in the full run. Before the live region, which gets its new text from that full run as it always
        # did (with the rerun after it, a browser test once found the region without the final text).
        st.rerun(scope="app")
    live_region(c, key=key(job, run, "live-region"))
    # Here, not beside the grid: it follows the run at each tick and goes once batches exist. Always a
    # slot at the same place, drawn empty once the plan exists: an element a fragment run no longer draws
    # stays on screen (stale) until that run has finished, while the slot's empty element replaces the
    # note the moment it arrives. Before the validation summary, whose number of elements varies.
    no_batches = st.empty()
    if c["metrics"]["batches_total"] == 0 and c["status"] in ("queued", "validating"):
        no_batches.info("No batches yet: they appear once the source has been read and split.",
                        icon=":material/hourglass_top:")
    validation_summary(c, job, run)
    st.session_state[key(job, run, "status")] = c["status"]


def render_monitor(job: str, run: str, statuses: list[str], sort: list[dict[str, str]] | None,
                   filters: dict[str, Any] | None) -> dict[str, Any]:
    """The right panel for one run. Returns the grid's state (selection, sort, filter) for the URL."""
    st.header("Run Monitor", anchor=False)
    st.fragment(_live, run_every=REFRESH_SECONDS)(job, run)
    c = cached(job, run)
    if c is None:
        return {}
    # Outside the timer: the buttons' states only change when the run turns final or active again,
    # and the toasts rerun the whole page then.
    actions(c, job, run)
    active = c["status"] in fmt.ACTIVE
    st.subheader("Batches", anchor=False)
    chosen, state, init_sort, init_filters = batches_panel(job, run, statuses, sort, filters)
    selected = state.get("selected") or []
    if selected:
        # Follows the ledger while the run is active (attempts, retry timeline); drawn once otherwise.
        st.fragment(batch_detail, run_every=REFRESH_SECONDS if active else None)(job, run, int(selected[0]))
    else:
        st.caption("Select a row to see its structured logs, error stack and retry timeline.")
    st.subheader("Batch durations", anchor=False)
    # The chart follows a running run; a finished one is drawn once (a retry restarts it via a full rerun).
    st.fragment(duration_charts, run_every=REFRESH_SECONDS if active else None)(job, run)
    # Until the grid reports a change, the URL keeps the sort and filter it was opened with.
    return {"status": chosen, "sort": state.get("sort", init_sort), "filter": state.get("filter", init_filters)}


def _not_found(job: str, run: str) -> None:
    st.info(f"No run {md_code(run)} for job {md_code(job)}. Pick a run from the list or start one.",
            icon=":material/search_off:")


def not_found_monitor(job: str, run: str) -> None:
    """The right panel for a run the person may not view: the same words as for a run that does not exist."""
    st.header("Run Monitor", anchor=False)
    _not_found(job, run)


def empty_monitor() -> None:
    st.header("Run Monitor", anchor=False)
    st.info("No run selected. Start a load on the left, or pick one of the recent runs.", icon=":material/info:")
