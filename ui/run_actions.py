"""The monitor's actions: retry failed batches and cancel (each confirmed in a dialog), the downloads."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import streamlit as st

import loader
from loader import LoaderError
from loader.runs import cancel

from . import format as fmt
from .errors import show_error
from .identity import OPERATORS_ONLY, operator_label, page_person, session_person
from .run_cache import key
from .text import alert


def _path(url: str) -> str:
    """The contract's URL without scheme and host, so the link works on whatever host serves the page."""
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def _close_dialog() -> None:
    st.session_state["dl_dialog"] = None


def operator_actor(job: str, where: str) -> str | None:
    """The actor when this session's person may act on the job now (the roles read again at the click,
    whatever the buttons showed); None after saying why not."""
    person = session_person()
    if person.may_operate(job):
        return person.actor
    alert(f"{where}: {OPERATORS_ONLY}. You may look at this run but not act on it.")
    return None


@st.dialog("Retry all failed batches?", on_dismiss=_close_dialog)
def _confirm_retry(job: str, run: str, failed: int) -> None:
    st.write(f"{failed} failed batch(es) of this run will be queued again. Committed batches are not touched.")
    with st.container(horizontal=True):
        if st.button("Retry failed batches", type="primary", key="dlg-retry-yes"):
            actor = operator_actor(job, "Retry")
            if actor is None:
                return
            try:
                queued = loader.retry_run(job, run, actor=actor)
            except LoaderError as exc:
                show_error(exc, where="Retry")
                return
            _close_dialog()
            st.session_state["dl_toast"] = (f"Retry queued for {len(queued)} batch(es)", ":material/replay:")
            st.rerun()
        if st.button("Keep as is", key="dlg-retry-no"):
            _close_dialog()
            st.rerun()


@st.dialog("Cancel this run?", on_dismiss=_close_dialog)
def _confirm_cancel(job: str, run: str) -> None:
    st.write("Batches not started yet will never start; batches already committed stay committed.")
    with st.container(horizontal=True):
        if st.button("Cancel run", type="primary", key="dlg-cancel-yes"):
            actor = operator_actor(job, "Cancel")
            if actor is None:
                return
            try:
                done = cancel(job, run, actor=actor)
            except LoaderError as exc:
                show_error(exc, where="Cancel")
                return
            _close_dialog()
            if done.note:  # every batch had ended before the cancel got the run: it finished instead
                st.session_state["dl_toast"] = (f"Not canceled: {done.note}", ":material/info:")
            elif done.queue_error:  # "Run canceled" itself is toasted by the live fragment, as for any end
                st.session_state["dl_toast"] = (
                    "The queue (Redis) cannot be reached: the run's waiting jobs will end by themselves, "
                    "loading nothing", ":material/cloud_off:")
            st.rerun()
        if st.button("Keep running", key="dlg-cancel-no"):
            _close_dialog()
            st.rerun()


def actions(c: dict[str, Any], job: str, run: str) -> None:
    """The buttons, and the dialog the user opened (it stays open across reruns until answered)."""
    m = c["metrics"]
    operator = page_person().may_operate(job)
    can_retry = c["status"] in fmt.RETRYABLE and m["batches_failed"] > 0 and operator
    with st.container(horizontal=True, wrap=True, gap="small"):
        if st.button(operator_label("Retry failed batches", operator), icon=":material/replay:",
                     disabled=not can_retry, key=key(job, run, "retry"),
                     help="Queue every failed batch again (the run must be failed or partial_success)"):
            st.session_state["dl_dialog"] = ("retry", job, run)
        if st.button(operator_label("Cancel run", operator), icon=":material/block:",
                     disabled=c["status"] not in fmt.ACTIVE or not operator, key=key(job, run, "cancel")):
            st.session_state["dl_dialog"] = ("cancel", job, run)
        st.link_button("Download logs (NDJSON)", _path(c["logs_url"]), icon=":material/download:")
        st.link_button("Download metrics (CSV)", _path(c["metrics_download_url"]), icon=":material/download:")
    dialog = st.session_state.get("dl_dialog")
    if dialog == ("retry", job, run) and can_retry:
        _confirm_retry(job, run, m["batches_failed"])
    elif dialog == ("cancel", job, run) and c["status"] in fmt.ACTIVE and operator:
        _confirm_cancel(job, run)
