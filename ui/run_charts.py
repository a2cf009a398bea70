"""The monitor's charts: each committed batch's duration with the p95 line, and rows per second."""

from __future__ import annotations

from typing import Any

import pandas as pd
import sqlalchemy as sa
import streamlit as st

from loader import LoaderError, browse

from . import format as fmt
from .errors import user_message
from .run_cache import fresh, key
from .text import caption


def duration_charts(job: str, run: str) -> None:
    """Read the series again only when the run's change signature moved (it also moves on late commits)."""
    c = fresh(job, run)
    version = c.get("_signature") if c else None
    cache_key = key(job, run, "series")
    kept = st.session_state.get(cache_key)
    if kept is not None and version is not None and kept[0] == version:
        series = kept[1]  # nothing changed since the last draw: skip the window query over every batch
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
    durations, rates = chart_specs(len(df), p95)
    committed = fmt.fmt_int(c["metrics"]["batches_succeeded"]) if c else "—"
    st.caption(f"{committed} committed batches: durations (line) with the p95 (dashed red); rows per second per "
               "batch below")
    st.vega_lite_chart(df, durations, width="stretch")
    st.vega_lite_chart(df, rates, width="stretch")


def chart_specs(points: int, p95: float | None) -> tuple[dict[str, Any], dict[str, Any]]:
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
