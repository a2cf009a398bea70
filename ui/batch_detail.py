"""The selected batch's detail: status, error, retry timeline, error stacks, structured log events."""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
import streamlit as st

import loader
from loader import LoaderError, browse
from loader.states import BatchStatus

from . import format as fmt
from .attempt_timeline import attempt_timeline
from .errors import show_error
from .identity import operator_label, page_person
from .run_actions import operator_actor
from .run_cache import fresh, key, zone


def _read(job: str, run: str, index: int) -> dict[str, Any] | None | bool:
    """The batch (None: not part of the run; False: unreadable, the error shown), read again only when
    the run's change signature moved."""
    c = fresh(job, run)
    version = (index, c.get("_signature")) if c else None
    kept = st.session_state.get(key(job, run, "detail"))
    if kept is not None and version is not None and kept[0] == version:
        d: dict[str, Any] | None = kept[1]  # nothing changed since the last draw: skip the three queries
        return d
    try:
        d = browse.batch_detail(job, run, index)
    except (LoaderError, sa.exc.OperationalError) as exc:
        show_error(exc, where=f"Batch {index}")
        return False
    st.session_state[key(job, run, "detail")] = (version, d)
    return d


def _retry_button(job: str, run: str, index: int) -> None:
    allowed = page_person().may_operate(job)
    if not st.button(operator_label("Retry this batch", allowed), icon=":material/replay:",
                     key=key(job, run, f"retry-{index}"), disabled=not allowed):
        return
    actor = operator_actor(job, "Retry")  # the roles read again at the click, whatever the button showed
    if actor is None:
        return
    try:
        loader.retry_run(job, run, [index], actor=actor)
    except LoaderError as exc:
        show_error(exc, where="Retry")
    else:
        # The whole page follows at once: status, actions, this batch's attempts and timeline.
        st.session_state["dl_toast"] = (f"Batch {index} queued again", ":material/replay:")
        st.rerun(scope="app")


def batch_detail(job: str, run: str, index: int) -> None:
    """One batch: a summary line, its error, and tabs for the retry timeline, error stacks and log events."""
    d = _read(job, run, index)
    if d is False:
        return
    if d is None:
        st.info(f"Batch {index} is not part of this run.")
        return
    assert isinstance(d, dict)
    st.subheader(f"Batch #{index}", anchor=False)
    with st.container(horizontal=True, gap="small", vertical_alignment="center"):
        st.text(f"Status: {d['status_label']} · attempts {d['attempts']} · rows {d['rows_attempted']} "
                f"(lines {d['first_line']}–{d['first_line'] + d['line_count'] - 1} of {d['source_file']})")
        status = st.session_state.get(key(job, run, "status"))
        if d["status"] == BatchStatus.FAILED.value and status in fmt.RETRYABLE:
            _retry_button(job, run, index)
    if d["error_message"]:
        text = d["error_message"]
        st.text(f"Error [{d.get('error_code') or 'error'}]: {text[:300]}{'…' if len(text) > 300 else ''}")
        if len(text) > 300:
            with st.expander("Full error message"):
                st.text(text)
    tabs = st.tabs(["Retry timeline", "Error stack", "Structured logs"])
    with tabs[0]:
        if d["attempt_timeline"]:
            attempt_timeline(d["attempt_timeline"], zone())
        else:
            st.caption("No attempt yet.")
    with tabs[1]:
        stacks = [(t["attempt"], t["error_stack"]) for t in d["attempt_timeline"] if t.get("error_stack")]
        if d.get("error_stack") and not stacks:
            stacks = [(d["attempts"], d["error_stack"])]
        if not stacks:
            st.caption("No error stack: this batch has not failed.")
        for attempt, stack in stacks:
            st.caption(f"Attempt {attempt}")
            st.code(stack, language=None)
    with tabs[2]:
        if d["logs_fragment"]:
            st.json(json.loads(json.dumps(d["logs_fragment"], default=str)), expanded=2)
        else:
            st.caption("No log events for this batch yet.")
