"""A batch's retry timeline: one row per attempt, times in the viewer's zone with UTC on hover."""

from __future__ import annotations

import html
from typing import Any

import streamlit as st

from loader.contract import message_now

from . import format as fmt

COLUMNS = ("Attempt", "Status", "Trigger", "Worker", "Started", "Ended", "Duration", "Error code", "Error")

CSS = """
.dl-timeline { border-collapse: collapse; width: 100%; font-size: 0.875rem; }
.dl-timeline th, .dl-timeline td { text-align: left; padding: 0.25rem 0.5rem; vertical-align: top;
  border-bottom: 1px solid rgba(128, 128, 128, 0.35); }
.dl-timeline td:last-child { overflow-wrap: anywhere; white-space: pre-wrap; }
.dl-timeline time[title] { text-decoration: underline dotted; text-underline-offset: 3px; cursor: help; }
"""


def _time(value: str | None, zone: str | None) -> str:
    """Local time, its UTC ISO time in ``datetime`` and on hover (as the grid's Committed at)."""
    shown = html.escape(fmt.local_time(value, zone))
    if value is None:
        return shown
    iso = html.escape(value)
    return f'<time datetime="{iso}" title="UTC: {iso}">{shown}</time>'


def timeline_html(attempts: list[dict[str, Any]], zone: str | None) -> str:
    """The table, every outside value (worker, error) escaped; each message worded for its attempt's end."""
    head = "".join(f'<th scope="col">{c}</th>' for c in COLUMNS)
    rows = []
    for t in attempts:
        message = message_now(t["error_message"], t["status"], t["attempt"]) or ""
        cells = [html.escape(str(t["attempt"])), html.escape(t["status"]), html.escape(t["trigger"] or ""),
                 html.escape(t["worker"] or ""), _time(t["started_at"], zone), _time(t["ended_at"], zone),
                 html.escape(fmt.fmt_ms(t["duration_ms"])), html.escape(t["error_code"] or ""), html.escape(message)]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (f'<table class="dl-timeline"><caption class="dl-sr-only">Attempts of this batch</caption>'
            f'<thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def attempt_timeline(attempts: list[dict[str, Any]], zone: str | None) -> None:
    """Draw the table (``st.html``: escaped text in our own elements, never Markdown)."""
    st.html(timeline_html(attempts, zone))
