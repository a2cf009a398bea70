"""The monitor's toasts: run started, transient DB error (will retry), run completed / failed / canceled."""

from __future__ import annotations

from typing import Any

import streamlit as st

from loader.states import RunStatus

from . import format as fmt
from .run_cache import key


def show_toasts(job: str, run: str, c: dict[str, Any] | None, stale: str | None) -> bool:
    """Each once, comparing the contract with the one seen at the previous tick. Returns True when the
    whole page must run again (a run that ended, or was retried from elsewhere; the full run shows the
    end's toast): the caller reruns it once this tick is drawn, so the badge and the cards show the new
    state at once rather than after the full run has reached them."""
    seen_key = key(job, run, "seen")
    seen = st.session_state.get(seen_key)
    if stale and not st.session_state.get(key(job, run, "stale_toast")):
        st.toast("Database unreachable or too slow: transient DB error, will retry", icon=":material/cloud_off:")
        st.session_state[key(job, run, "stale_toast")] = True
    if not stale:
        st.session_state[key(job, run, "stale_toast")] = False
    if c is None:
        return False
    now = {"status": c["status"], "transient": c["metrics"].get("transient_errors", 0)}
    st.session_state[seen_key] = now
    if seen is None:
        return False
    if now["transient"] > seen["transient"]:
        n = now["transient"] - seen["transient"]
        st.toast(f"Transient DB error in {n} batch attempt(s): will retry", icon=":material/replay:")
    if seen["status"] in fmt.FINAL and now["status"] not in fmt.FINAL:
        # Retried from elsewhere (the CLI, another tab): the actions row, the start button's warning,
        # the runs list and the chart's timer follow the run again, in one full run.
        return True
    if now["status"] != seen["status"] and now["status"] in fmt.FINAL:
        if now["status"] in (RunStatus.SUCCESS.value, RunStatus.PARTIAL_SUCCESS.value):
            message = (f"Run completed: {fmt.run_badge(now['status']).label}", ":material/check_circle:")
        elif now["status"] == RunStatus.FAILED.value:
            message = ("Run failed", ":material/error:")
        else:
            message = ("Run canceled", ":material/block:")
        # The whole page follows (the start button's warning, the runs list, the chart's refresh):
        # the toast is shown by that full run.
        st.session_state["dl_toast"] = message
        return True
    return False


def expect_start(job: str, run: str) -> None:
    """The page just started this run: its first tick compares with ``queued``, so a run that fails (or
    ends) before the monitor first reads it still gets its toast."""
    st.session_state[key(job, run, "seen")] = {"status": RunStatus.QUEUED.value, "transient": 0}
