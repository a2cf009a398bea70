"""The monitor's validation summary: counts by class, the first examples, the rejected records' download."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pandas as pd
import streamlit as st

from . import format as fmt
from .identity import operator_label, page_person
from .routes import API_PATH
from .run_cache import key

EXAMPLE_COLUMNS = ["path", "message", "sample_value", "error_class", "batch_index", "source_file", "line_no"]


def validation_summary(c: dict[str, Any], job: str, run: str) -> None:
    """An expander drawn only while it is open (not on every tick of the timer)."""
    v = c["validation_summary"]
    total = v["required_field_errors"] + v["json_shape_errors"]
    # The label stays fixed: the expander's identity includes it, and a new label would close it.
    with st.expander("Validation summary", icon=":material/rule:", key=key(job, run, "validation"),
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
        df = pd.DataFrame(v["examples"], columns=EXAMPLE_COLUMNS)
        st.dataframe(df, hide_index=True, width="stretch", column_config={
            "path": "Path", "message": "Message", "sample_value": "Sample value", "error_class": "Class",
            "batch_index": st.column_config.NumberColumn("Batch #"), "source_file": "File",
            "line_no": st.column_config.NumberColumn("Line")})
        rejects = f"{API_PATH}/{quote(job, safe='')}/{quote(run, safe='')}/rejects.ndjson"
        # Rejected records are raw source data: operators only (the route refuses anyone else too).
        operator = page_person().may_operate(job)
        st.link_button(operator_label("Download rejected records (NDJSON)", operator), rejects,
                       icon=":material/download:", disabled=not operator)
