"""Recent runs of every job, newest first, each linking to its Run Monitor."""

from __future__ import annotations

from urllib.parse import quote

import pandas as pd
import streamlit as st

import loader
from loader import LoaderError
from ui import format as fmt
from ui.errors import show_error
from ui.layout import inject_css
from ui.routes import PAGE_PATH

inject_css()
st.title("Recent runs", anchor=False)
st.page_link("pages/data_loader.py", label="Start a load in the Data Loader", icon=":material/database_upload:")


@st.fragment(run_every=3)
def recent() -> None:
    try:
        runs = loader.list_runs(limit=100)
    except LoaderError as exc:
        show_error(exc)
        return
    if not runs:
        st.info("No runs yet. Start one from the Data Loader page.", icon=":material/history:")
        return
    zone = st.context.timezone
    df = pd.DataFrame([{
        "Open": f"{PAGE_PATH}/{quote(r['etl_job_id'], safe='')}/{quote(r['etl_run_id'], safe='')}",
        "Job": r["etl_job_id"], "Run ID": r["etl_run_id"], "Status": fmt.run_badge(r["status"]).label,
        "Started": fmt.local_time(r["started_at"], zone), "Batches": r["batches_total"],
        "Failed": r["batches_failed"], "Inserted": r["rows_inserted"], "Updated": r["rows_updated"],
    } for r in runs])
    st.dataframe(df, hide_index=True, width="stretch", column_config={
        "Open": st.column_config.LinkColumn("Open", display_text="Open monitor")})


recent()
