"""The monitor's batches panel: the status filter pills over the batches grid."""

from __future__ import annotations

from typing import Any

import streamlit as st

from loader import browse

from .grid import batches_grid

BATCH_STATUSES = browse.STATUSES


def batches_panel(job: str, run: str, statuses: list[str], sort: list[dict[str, str]] | None,
                  filters: dict[str, Any] | None) -> tuple[list[str], dict[str, Any], Any, Any]:
    """Pills and grid. Returns the chosen statuses, the grid's state, and the sort and filter it opened with."""
    chosen = st.pills("Show batches", BATCH_STATUSES, selection_mode="multi", default=statuses or None,
                      key=f"dl-status:{job}:{run}", help="Filter the table by batch status (kept in the URL)")
    chosen_list = [s for s in BATCH_STATUSES if s in (chosen or [])]
    grid_key = f"dl-grid:{job}:{run}:{','.join(chosen_list)}"
    # A grid keeps the sort and filter it was first drawn with: its own state lives in the browser.
    opened_with = st.session_state.setdefault("dl_grid_init", {}).setdefault(grid_key, (sort, filters))
    init_sort, init_filters = opened_with
    with st.container(key="dl-grid-wrap"):
        state = batches_grid(job, run, chosen_list, init_sort, init_filters, key=grid_key)
    return chosen_list, state, init_sort, init_filters
