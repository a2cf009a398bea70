"""The Run Monitor: header, metric cards, validation summary, actions, batches grid, batch detail, chart."""

from __future__ import annotations

import html
import json
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import pandas as pd
import sqlalchemy as sa
import streamlit as st

import loader
from loader import LoaderError, browse
from loader.runs import cancel
from loader.states import BatchStatus, RunStatus

from . import format as fmt
from .errors import show_error, user_message
from .grid import batches_grid
from .routes import API_PATH
from .text import alert, caption, md_code

#: Seconds between two refreshes of the header, cards and validation summary. The spec asks for 2 s or
#: less and a change on screen within 2 s: a 2 s timer alone waits up to 2 s, so 1.5 s leaves room for
#: the query and the render (BENCHMARKS.md, "Console").
REFRESH_SECONDS = 1.5
#: Seconds between two refreshes of the duration chart while the run is active (its query runs only when
#: the run's change signature moved).
CHART_SECONDS = 2.0
BATCH_STATUSES = browse.STATUSES


def _key(job: str, run: str, name: str) -> str:
    return f"mon:{job}:{run}:{name}"


def _zone() -> str | None:
    try:
        return st.context.timezone
    except Exception:  # noqa: BLE001 - no browser context (AppTest)
        return None


def _path(url: str) -> str:
    """The contract's URL without scheme and host, so the link works on whatever host serves the page."""
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def _load(job: str, run: str) -> tuple[dict[str, Any] | None, str | None]:
    """The contract (cached while the run's change signature stays put), or the last one with the outage message.

    Most ticks change nothing: one index-only statement (``change_signature``, under 1 ms at 100k
    batches) tells, instead of the metrics aggregate over every batch of the run (about 70 ms at 100k
    batches). The signature is read before the contract, so a change landing in between shows at the
    next tick rather than never.
    """
    cache_key = _key(job, run, "contract")
    cached: dict[str, Any] | None = st.session_state.get(cache_key)
    try:
        signature = loader.change_signature(job, run)
        if cached is not None and cached["_signature"] == signature:
            return cached, None
        contract = loader.run_contract(job, run, include_batches=False)
    except loader.RunNotFound:
        raise
    except (LoaderError, sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
        return cached, user_message(exc)
    contract["_signature"] = signature
    contract["_fetched"] = time.monotonic()
    st.session_state[cache_key] = contract
    return contract, None


def _elapsed_ms(c: dict[str, Any]) -> float | None:
    """The run's elapsed time, moving on between two reads of the ledger while the run is active."""
    elapsed = c["metrics"].get("elapsed_ms")
    if elapsed is None or c["status"] in fmt.FINAL or "_fetched" not in c:
        return elapsed
    return float(elapsed) + (time.monotonic() - c["_fetched"]) * 1000


def _toasts(job: str, run: str, c: dict[str, Any], stale: str | None) -> None:
    """Run started / transient DB error (will retry) / run completed / run failed, each once."""
    seen_key = _key(job, run, "seen")
    seen = st.session_state.get(seen_key)
    if stale and not st.session_state.get(_key(job, run, "stale_toast")):
        st.toast("Database unreachable or too slow: transient DB error, will retry", icon=":material/cloud_off:")
        st.session_state[_key(job, run, "stale_toast")] = True
    if not stale:
        st.session_state[_key(job, run, "stale_toast")] = False
    if c is None:
        return
    now = {"status": c["status"], "transient": c["metrics"].get("transient_errors", 0)}
    st.session_state[seen_key] = now
    if seen is None:
        return
    if now["transient"] > seen["transient"]:
        n = now["transient"] - seen["transient"]
        st.toast(f"Transient DB error in {n} batch attempt(s): will retry", icon=":material/replay:")
    if seen["status"] in fmt.FINAL and now["status"] not in fmt.FINAL:
        # Retried from elsewhere (the CLI, another tab): the actions row, the start button's warning,
        # the runs list and the chart's timer follow the run again, in one full run.
        st.rerun(scope="app")
    if now["status"] != seen["status"] and now["status"] in fmt.FINAL:
        if now["status"] in (RunStatus.SUCCESS.value, RunStatus.PARTIAL_SUCCESS.value):
            message = (f"Run completed: {fmt.run_badge(now['status']).label}", ":material/check_circle:")
        elif now["status"] == "failed":
            message = ("Run failed", ":material/error:")
        else:
            message = ("Run canceled", ":material/block:")
        # The whole page follows (the start button's warning, the runs list, the chart's refresh):
        # the toast is shown by that full run.
        st.session_state["dl_toast"] = message
        st.rerun(scope="app")


def _header(c: dict[str, Any], stale: str | None) -> None:
    """Status, lineage and times: three elements (each element of a tick is one message to the browser,
    and every message is a GIL hand-off between the script thread and the event loop that sends it)."""
    badge = fmt.run_badge(c["status"])
    active = c["status"] in fmt.ACTIVE
    live = f":material/sensors: Live: refreshing every {REFRESH_SECONDS:g} s" if active and not stale else (
        ":material/pause_circle: Reconnecting…" if stale else ":material/pause_circle: Run finished: no more updates")
    line = [f":{badge.color}-badge[{badge.icon} {badge.label}]"]
    if stale:
        line.append(":orange-badge[:material/cloud_off: Stale]")
    line.append(f":small[:gray[{live} · Last refreshed {fmt.md_text(fmt.local_time(datetime.now(UTC), _zone()))}]]")
    st.markdown(" ".join(line))
    if stale:
        alert(stale, "warning")
    st.text(f"etl_job_id: {c['etl_job_id']}\netl_run_id: {c['etl_run_id']}")
    if c.get("error_message"):
        alert(f"{c.get('error_code') or 'error'}: {c['error_message']}")


def _time(label: str, value: str | None, zone: str | None) -> str:
    """``Started: <local time>`` with the UTC ISO time on hover and in ``datetime``."""
    shown = html.escape(fmt.local_time(value, zone))
    if value is None:
        return f"<span>{label}: {shown}</span>"
    iso = html.escape(value)
    return f'<span>{label}: <time datetime="{iso}" title="UTC: {iso}">{shown}</time></span>'


def _title(tip: str | None) -> str:
    return f' title="{html.escape(tip)}"' if tip else ""


def _cards(c: dict[str, Any]) -> None:
    """Times and the metric cards as one HTML block: one message per tick instead of a dozen."""
    m = c["metrics"]
    zone = _zone()
    cards = [
        ("Rows inserted", fmt.fmt_int(m["rows_inserted"]), None),
        ("Rows updated", fmt.fmt_int(m["rows_updated"]), None),
        ("Rows validated", fmt.fmt_int(m["rows_validated"]), None),
        ("Batches total", fmt.fmt_int(m["batches_total"]), None),
        ("Batches succeeded", fmt.fmt_int(m["batches_succeeded"]), None),
        ("Batches failed", fmt.fmt_int(m["batches_failed"]), None),
        ("Retries attempted", fmt.fmt_int(m["retries"]), None),
        ("Elapsed", fmt.fmt_ms(_elapsed_ms(c)), "Time since the run started (until it completed)"),
        ("Avg batch", fmt.fmt_ms(m["batch_duration_ms_avg"]), "Mean duration of committed batches"),
        ("p95 batch", fmt.fmt_ms(m["batch_duration_ms_p95"]), "95th percentile of committed batch durations"),
        ("Rows/s", fmt.fmt_int(round(m["throughput_rps"])) if m["throughput_rps"] is not None else "—",
         "Throughput: rows committed per second of loading"),
    ]
    times = [_time(label, c.get(field), zone) for label, field in
             (("Started", "started_at"), ("Loaded", "loaded_at"), ("Completed", "completed_at"))]
    times.append(f"<span>Batch size: {fmt.fmt_int(c['batch_size'])}</span>")
    times.append(f"<span>Target: {html.escape(c.get('target_table') or '—')}</span>")
    body = "".join(
        f'<div class="dl-card"{_title(tip)}><dt class="dl-l">{html.escape(label)}</dt>'
        f'<dd class="dl-v">{html.escape(value)}</dd></div>' for label, value, tip in cards)
    st.html(f'<div class="dl-times">{" · ".join(times)}</div><dl class="dl-cards">{body}</dl>')


def _live_region(c: dict[str, Any]) -> None:
    """A polite ARIA live region: status and batch progress (changes a few times per run, not each tick)."""
    m = c["metrics"]
    done = m["batches_succeeded"] + m["batches_failed"]
    text = (f"Run {fmt.run_badge(c['status']).label}. {done} of {m['batches_total']} batches done, "
            f"{m['batches_failed']} failed. {m['rows_inserted']} rows inserted, {m['rows_updated']} updated.")
    if c["status"] in fmt.ACTIVE:  # announce coarse progress only: every 10 % of the batches
        total = max(m["batches_total"], 1)
        step = int(done * 10 / total) * 10
        text = f"Run {fmt.run_badge(c['status']).label}. About {step} percent of batches done."
    st.html(f'<div class="dl-sr-only" role="status" aria-live="polite" aria-atomic="true">{html.escape(text)}</div>')


def _validation(c: dict[str, Any], job: str, run: str) -> None:
    v = c["validation_summary"]
    total = v["required_field_errors"] + v["json_shape_errors"]
    # Lazy: its contents are computed and sent only while it is open (not on every tick of the timer).
    # The label stays fixed: the expander's identity includes it, and a new label would close it.
    with st.expander("Validation summary", icon=":material/rule:", key=_key(job, run, "validation"),
                     on_change="rerun") as box:
        if not box.open:
            return
        if total == 0 and not v["examples"]:
            st.success("No validation issues", icon=":material/check_circle:")
            return
        with st.container(horizontal=True, gap="small"):
            st.metric("Required field errors", fmt.fmt_int(v["required_field_errors"]), border=True, width=200)
            st.metric("JSON shape errors", fmt.fmt_int(v["json_shape_errors"]), border=True, width=200)
        st.caption(f"First {len(v['examples'])} example(s)")
        df = pd.DataFrame(v["examples"], columns=["path", "message", "sample_value", "error_class", "batch_index",
                                                  "source_file", "line_no"])
        st.dataframe(df, hide_index=True, width="stretch", column_config={
            "path": "Path", "message": "Message", "sample_value": "Sample value", "error_class": "Class",
            "batch_index": st.column_config.NumberColumn("Batch #"), "source_file": "File",
            "line_no": st.column_config.NumberColumn("Line")})
        st.link_button("Download rejected records (NDJSON)", f"{API_PATH}/{_q(job)}/{_q(run)}/rejects.ndjson",
                       icon=":material/download:")


def _q(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")


def _close_dialog() -> None:
    st.session_state["dl_dialog"] = None


@st.dialog("Retry all failed batches?", on_dismiss=_close_dialog)
def _confirm_retry(job: str, run: str, failed: int) -> None:
    st.write(f"{failed} failed batch(es) of this run will be queued again. Committed batches are not touched.")
    with st.container(horizontal=True):
        if st.button("Retry failed batches", type="primary", key="dlg-retry-yes"):
            try:
                queued = loader.retry_run(job, run)
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
            try:
                done = cancel(job, run)
            except LoaderError as exc:
                show_error(exc, where="Cancel")
                return
            _close_dialog()
            if done.queue_error:  # "Run canceled" itself is toasted by the live fragment, as for any end
                st.session_state["dl_toast"] = (
                    "The queue (Redis) cannot be reached: the run's waiting jobs will end by themselves, "
                    "loading nothing", ":material/cloud_off:")
            st.rerun()
        if st.button("Keep running", key="dlg-cancel-no"):
            _close_dialog()
            st.rerun()


def _actions(c: dict[str, Any], job: str, run: str) -> None:
    m = c["metrics"]
    can_retry = c["status"] in fmt.RETRYABLE and m["batches_failed"] > 0
    with st.container(horizontal=True, wrap=True, gap="small"):
        if st.button("Retry failed batches", icon=":material/replay:", disabled=not can_retry,
                     key=_key(job, run, "retry"),
                     help="Queue every failed batch again (the run must be failed or partial_success)"):
            st.session_state["dl_dialog"] = ("retry", job, run)
        if st.button("Cancel run", icon=":material/block:", disabled=c["status"] not in fmt.ACTIVE,
                     key=_key(job, run, "cancel")):
            st.session_state["dl_dialog"] = ("cancel", job, run)
        st.link_button("Download logs (NDJSON)", _path(c["logs_url"]), icon=":material/download:")
        st.link_button("Download metrics (CSV)", _path(c["metrics_download_url"]), icon=":material/download:")
    # A dialog stays open across reruns until it is answered or dismissed.
    dialog = st.session_state.get("dl_dialog")
    if dialog == ("retry", job, run) and can_retry:
        _confirm_retry(job, run, m["batches_failed"])
    elif dialog == ("cancel", job, run) and c["status"] in fmt.ACTIVE:
        _confirm_cancel(job, run)


def _live(job: str, run: str) -> None:
    """Everything that follows the run: refreshed every REFRESH_SECONDS by the fragment."""
    try:
        c, stale = _load(job, run)
    except loader.RunNotFound:
        st.info(f"No run {md_code(run)} for job {md_code(job)}. Pick a run from the list or start one.",
                icon=":material/search_off:")
        return
    _toasts(job, run, c, stale)
    if c is None:
        alert(stale or "No data yet", "warning")
        st.badge("Stale", icon=":material/cloud_off:", color="orange")
        return
    _header(c, stale)
    _cards(c)
    _live_region(c)
    _validation(c, job, run)
    if c["metrics"]["batches_total"] == 0 and c["status"] in ("queued", "validating"):
        # Here, not beside the grid: it follows the run at each tick and goes once batches exist.
        st.info("No batches yet: they appear once the source has been read and split.",
                icon=":material/hourglass_top:")
    st.session_state[_key(job, run, "status")] = c["status"]


def _chart(job: str, run: str) -> None:
    c = st.session_state.get(_key(job, run, "contract"))
    version = c.get("_signature") if c else None  # the live fragment's: it also moves on late commits
    cache_key = _key(job, run, "series")
    cached = st.session_state.get(cache_key)
    if cached is not None and version is not None and cached[0] == version:
        series = cached[1]  # nothing changed since the last draw: skip the window query over every batch
    else:
        try:
            series = browse.duration_series(job, run)
        except (LoaderError, sa.exc.OperationalError) as exc:
            caption(f"Chart unavailable: {user_message(exc)}")
            return
        st.session_state[cache_key] = (version, series)
    if not series:
        st.caption("No committed batches yet: the duration chart appears with the first one.")
        return
    # Only what the chart draws travels to the browser (each redraw re-sends the data). The Vega-Lite
    # specs are written out, not built with Altair: Altair validates its whole spec against the
    # Vega-Lite JSON schema on every draw (about 24 ms of the server's CPU per chart tick).
    df = pd.DataFrame(series, columns=["batch", "duration_ms", "rows_per_s"])
    p95 = c["metrics"].get("batch_duration_ms_p95") if c else None
    durations, rates = _chart_specs(len(df), p95)
    st.caption("Batch durations (line) with the p95 (dashed red); rows per second per batch below")
    st.vega_lite_chart(df, durations, width="stretch")
    st.vega_lite_chart(df, rates, width="stretch")


def _chart_specs(points: int, p95: float | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Vega-Lite specs of the duration chart (line, p95 rule) and the rows/s area, for the series' frame."""
    x = {"field": "batch", "type": "quantitative", "title": "Batch #", "axis": {"format": "d", "tickMinStep": 1}}
    batch_tip = {"field": "batch", "type": "quantitative", "title": "Batch #"}
    layers: list[dict[str, Any]] = [{
        "mark": {"type": "line", "point": points <= 200, "color": "#1d4ed8"},
        "encoding": {"x": x, "y": {"field": "duration_ms", "type": "quantitative", "title": "Duration (ms)"},
                     "tooltip": [batch_tip, {"field": "duration_ms", "type": "quantitative", "title": "ms",
                                             "format": ".1f"}]}}]
    if p95 is not None:
        layers.append({
            "data": {"values": [{"p95": p95}]},
            "mark": {"type": "rule", "color": "#b91c1c", "strokeDash": [6, 4]},
            "encoding": {"y": {"field": "p95", "type": "quantitative"},
                         "tooltip": [{"field": "p95", "type": "quantitative", "title": "p95 (ms)", "format": ".1f"}]}})
    durations = {"height": 180, "layer": layers}
    rates = {"height": 120, "mark": {"type": "area", "color": "#15803d", "opacity": 0.35, "line": True},
             "encoding": {"x": x, "y": {"field": "rows_per_s", "type": "quantitative", "title": "Rows/s"},
                          "tooltip": [batch_tip, {"field": "rows_per_s", "type": "quantitative", "title": "rows/s",
                                                  "format": ",.0f"}]}}
    return durations, rates


def _detail(job: str, run: str, index: int) -> None:
    c = st.session_state.get(_key(job, run, "contract"))
    version = (index, c.get("_signature")) if c else None  # the live fragment's: moves with any change
    cached = st.session_state.get(_key(job, run, "detail"))
    if cached is not None and version is not None and cached[0] == version:
        d = cached[1]  # nothing changed since the last draw: skip the three queries
    else:
        try:
            d = browse.batch_detail(job, run, index)
        except (LoaderError, sa.exc.OperationalError) as exc:
            show_error(exc, where=f"Batch {index}")
            return
        st.session_state[_key(job, run, "detail")] = (version, d)
    if d is None:
        st.info(f"Batch {index} is not part of this run.")
        return
    st.subheader(f"Batch #{index}", anchor=False)
    with st.container(horizontal=True, gap="small", vertical_alignment="center"):
        st.text(f"Status: {d['status_label']} · attempts {d['attempts']} · rows {d['rows_attempted']} "
                f"(lines {d['first_line']}–{d['first_line'] + d['line_count'] - 1} of {d['source_file']})")
        status = st.session_state.get(_key(job, run, "status"))
        if d["status"] == BatchStatus.FAILED.value and status in fmt.RETRYABLE:
            if st.button("Retry this batch", icon=":material/replay:", key=_key(job, run, f"retry-{index}")):
                try:
                    loader.retry_run(job, run, [index])
                except LoaderError as exc:
                    show_error(exc, where="Retry")
                else:
                    # The whole page follows at once: status, actions, this batch's attempts and timeline.
                    st.session_state["dl_toast"] = (f"Batch {index} queued again", ":material/replay:")
                    st.rerun(scope="app")
    if d["error_message"]:
        text = d["error_message"]
        st.text(f"Error [{d.get('error_code') or 'error'}]: {text[:300]}{'…' if len(text) > 300 else ''}")
        if len(text) > 300:
            with st.expander("Full error message"):
                st.text(text)
    tabs = st.tabs(["Retry timeline", "Error stack", "Structured logs"])
    with tabs[0]:
        if d["attempt_timeline"]:
            st.dataframe(pd.DataFrame(d["attempt_timeline"]).drop(columns=["error_stack"]), hide_index=True,
                         width="stretch")
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


def render_monitor(job: str, run: str, statuses: list[str], sort: list[dict[str, str]] | None,
                   filters: dict[str, Any] | None) -> dict[str, Any]:
    """The right panel for one run. Returns the grid's state (selection, sort, filter) for the URL."""
    st.subheader("Run Monitor", anchor=False)
    st.fragment(_live, run_every=REFRESH_SECONDS)(job, run)
    c = st.session_state.get(_key(job, run, "contract"))
    if c is None:
        return {}
    # Outside the timer: the buttons' states only change when the run turns final or active again,
    # and _toasts reruns the whole page then.
    _actions(c, job, run)
    st.markdown("##### Batches")
    chosen = st.pills("Show batches", BATCH_STATUSES, selection_mode="multi", default=statuses or None,
                      key=f"dl-status:{job}:{run}", help="Filter the table by batch status (kept in the URL)")
    chosen_list = [s for s in BATCH_STATUSES if s in (chosen or [])]
    grid_key = f"dl-grid:{job}:{run}:{','.join(chosen_list)}"
    if grid_key not in st.session_state.get("dl_grid_init", {}):
        st.session_state.setdefault("dl_grid_init", {})[grid_key] = (sort, filters)
    init_sort, init_filters = st.session_state["dl_grid_init"][grid_key]
    with st.container(key="dl-grid-wrap"):
        state = batches_grid(job, run, chosen_list, init_sort, init_filters, key=grid_key)
    selected = state.get("selected") or []
    if selected:
        # Follows the ledger while the run is active (attempts, retry timeline); drawn once otherwise.
        st.fragment(_detail, run_every=REFRESH_SECONDS if c["status"] in fmt.ACTIVE else None)(
            job, run, int(selected[0]))
    else:
        st.caption("Select a row to see its structured logs, error stack and retry timeline.")
    st.markdown("##### Batch durations")
    # The chart follows a running run; a finished one is drawn once (a retry restarts it via a full rerun).
    st.fragment(_chart, run_every=CHART_SECONDS if c["status"] in fmt.ACTIVE else None)(job, run)
    # Until the grid reports a change, the URL keeps the sort and filter it was opened with.
    return {"status": chosen_list, "sort": state.get("sort", init_sort), "filter": state.get("filter", init_filters)}


def empty_monitor() -> None:
    st.subheader("Run Monitor", anchor=False)
    st.info("No run selected. Start a load on the left, or pick one of the recent runs.", icon=":material/info:")
