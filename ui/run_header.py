"""The monitor's header and cards: status badge, lineage, times, metric cards, the ARIA live region."""

from __future__ import annotations

import html
from datetime import UTC, datetime
from typing import Any

import streamlit as st

from . import format as fmt
from .live_region import announce
from .run_cache import elapsed_ms, zone
from .text import alert


def header(c: dict[str, Any], stale: str | None, refresh_seconds: float) -> None:
    """Status, lineage and times: three elements (each element of a tick is one message to the browser,
    and every message is a GIL hand-off between the script thread and the event loop that sends it)."""
    badge = fmt.run_badge(c["status"])
    active = c["status"] in fmt.ACTIVE
    live = f":material/sensors: Live: refreshing every {refresh_seconds:g} s" if active and not stale else (
        ":material/pause_circle: Reconnecting…" if stale else ":material/pause_circle: Run finished: no more updates")
    line = [f":{badge.color}-badge[{badge.icon} {badge.label}]"]
    if stale:
        line.append(":orange-badge[:material/cloud_off: Stale]")
    line.append(f":small[:gray[{live} · Last refreshed {fmt.md_text(fmt.local_time(datetime.now(UTC), zone()))}]]")
    st.markdown(" ".join(line))
    if stale:
        alert(stale, "warning")
    # Lineage, and who started the run (text from outside: st.text shows it as given, never as Markdown).
    started_by = c.get("started_by") or "(not recorded: started before the audit trail)"
    st.text(f"etl_job_id: {c['etl_job_id']}\netl_run_id: {c['etl_run_id']}\nstarted by: {started_by}")
    if c.get("error_message"):
        alert(f"{c.get('error_code') or 'error'}: {c['error_message']}")


#: How many of the run's actions the header lists (the newest; the contract and the logs export hold all).
HISTORY_SHOWN = 10


def _detail(action: dict[str, Any]) -> str:
    """What was asked, in a few words (plain text: the caller escapes it)."""
    d = action.get("detail") or {}
    kind = action["action"]
    if kind == "retry":
        batches = d.get("batches") or []
        shown = ", ".join(str(b) for b in batches[:10]) + (" …" if len(batches) > 10 else "")
        return f"retry of batch(es) {shown}" if d.get("asked") == "named" else f"retry of every failed batch ({shown})"
    if kind == "cancel":
        return "cancel" if d.get("outcome") == "canceled" else f"cancel (too late: the run ended {d.get('outcome')})"
    if kind == "forced_start":
        return f"forced start beside run {d.get('run_in_progress')} ({d.get('its_status')})"
    return f"start (batch size {d.get('batch_size')})"


def history(c: dict[str, Any]) -> None:
    """The run's actions, oldest first: who asked what, when (one escaped HTML block)."""
    acts = c.get("actions") or []
    if not acts:
        return
    zone_name = zone()
    items = "".join(
        f"<li>{_time_tag(a['at'], zone_name)} · {html.escape(a['actor'])} · "
        f"{html.escape(_detail(a))}</li>" for a in acts[-HISTORY_SHOWN:])
    more = f" (the last {HISTORY_SHOWN} of {len(acts)})" if len(acts) > HISTORY_SHOWN else ""
    st.html(f'<section class="dl-history" aria-label="History of actions"><p class="dl-caption">History{more}</p>'
            f"<ol>{items}</ol></section>")


def _time_tag(value: str | None, zone_name: str | None) -> str:
    """The local time, with the UTC ISO time on hover and in ``datetime``."""
    shown = html.escape(fmt.local_time(value, zone_name))
    if value is None:
        return shown
    iso = html.escape(value)
    return f'<time datetime="{iso}" title="UTC: {iso}">{shown}</time>'


def _time(label: str, value: str | None, zone_name: str | None) -> str:
    """``Started: <local time>``."""
    return f"<span>{label}: {_time_tag(value, zone_name)}</span>"


def _title(tip: str | None) -> str:
    return f' title="{html.escape(tip)}"' if tip else ""


def cards(c: dict[str, Any]) -> None:
    """Times and the metric cards as one HTML block: one message per tick instead of a dozen."""
    m = c["metrics"]
    shown = [
        ("Rows inserted", fmt.fmt_int(m["rows_inserted"]), None),
        ("Rows updated", fmt.fmt_int(m["rows_updated"]), None),
        ("Rows validated", fmt.fmt_int(m["rows_validated"]), None),
        ("Batches total", fmt.fmt_int(m["batches_total"]), None),
        ("Batches succeeded", fmt.fmt_int(m["batches_succeeded"]), None),
        ("Batches failed", fmt.fmt_int(m["batches_failed"]), None),
        ("Retries attempted", fmt.fmt_int(m["retries"]), None),
        *([("Batches canceled", fmt.fmt_int(m["batches_canceled"]), "Not started: the run was canceled")]
          if m.get("batches_canceled") else []),
        ("Elapsed", fmt.fmt_ms(m.get("loading_ms")),
         "Loading time: the time at least one batch attempt was running (idle time before a retry not counted)"),
        ("Wall time", fmt.fmt_ms(elapsed_ms(c)), "Time since the run started (until it completed)"),
        ("Avg batch", fmt.fmt_ms(m["batch_duration_ms_avg"]), "Mean duration of committed batches"),
        ("p95 batch", fmt.fmt_ms(m["batch_duration_ms_p95"]), "95th percentile of committed batch durations"),
        ("Rows/s", fmt.fmt_int(round(m["throughput_rps"])) if m["throughput_rps"] is not None else "—",
         "Throughput: rows committed per second of loading time (Elapsed)"),
    ]
    zone_name = zone()
    times = [_time(label, c.get(field), zone_name) for label, field in
             (("Started", "started_at"), ("Loaded", "loaded_at"), ("Completed", "completed_at"))]
    times.append(f"<span>Batch size: {fmt.fmt_int(c['batch_size'])}</span>")
    times.append(f"<span>Target: {html.escape(c.get('target_table') or '—')}</span>")
    body = "".join(
        f'<div class="dl-card"{_title(tip)}><dt class="dl-l">{html.escape(label)}</dt>'
        f'<dd class="dl-v">{html.escape(value)}</dd></div>' for label, value, tip in shown)
    st.html(f'<div class="dl-times">{" · ".join(times)}</div><dl class="dl-cards">{body}</dl>')


def live_region(c: dict[str, Any], key: str) -> None:
    """A polite ARIA live region: status and batch progress (changes a few times per run, not each tick)."""
    m = c["metrics"]
    done = m["batches_succeeded"] + m["batches_failed"]
    canceled = f", {m['batches_canceled']} not started (run canceled)" if m.get("batches_canceled") else ""
    text = (f"Run {fmt.run_badge(c['status']).label}. {done} of {m['batches_total']} batches done, "
            f"{m['batches_failed']} failed{canceled}. {m['rows_inserted']} rows inserted, "
            f"{m['rows_updated']} updated.")
    if c["status"] in fmt.ACTIVE:  # announce coarse progress only: every 10 % of the batches
        total = max(m["batches_total"], 1)
        step = int(done * 10 / total) * 10
        text = f"Run {fmt.run_badge(c['status']).label}. About {step} percent of batches done."
    announce(text, key=key)
