"""Recent runs of every job, newest first, each linking to its Run Monitor."""

from __future__ import annotations

import streamlit as st

from ui.identity import page_person
from ui.layout import inject_css
from ui.monitor import REFRESH_SECONDS
from ui.runs_table import recent_runs, runs_frame

inject_css()
st.title("Recent runs", anchor=False)
st.page_link("pages/data_loader.py", label="Start a load in the Data Loader", icon=":material/database_upload:")


@st.fragment(run_every=REFRESH_SECONDS)  # statuses follow the ledger like the monitor's
def recent() -> None:
    runs = recent_runs(None, limit=100, empty="No runs yet. Start one from the Data Loader page.",
                       person=page_person())
    if not runs:
        return
    df = runs_frame(runs, ["Open", "Job", "Run ID", "Status", "Started", "Batches", "Failed", "Inserted", "Updated"])
    st.dataframe(df, hide_index=True, width="stretch", column_config={
        "Open": st.column_config.LinkColumn("Open", display_text="Open monitor")})


recent()
