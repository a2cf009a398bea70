"""The recent-runs table of the Recent runs and Data Loader pages: fetched, explained when empty, framed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import streamlit as st

import loader
from loader import LoaderError, run_metrics

from . import format as fmt
from .errors import show_error
from .identity import Person
from .routes import run_path


def recent_runs(job: str | None, *, limit: int, empty: str, person: Person | None = None) -> list[dict[str, Any]]:
    """``loader.list_runs(job, limit)``, newest first; [] after saying why (the error, or ``empty``).

    Runs in progress are read through the process's shared metrics cache (the monitors' own), ended runs'
    counts are kept by ``loader.recent_runs``: a refresh costs one statement however many runs exist.

    With ``person``, only the runs of jobs they may view: the others are left out by the query (they take
    no place in the ``limit``) and checked again here (a job the catalog no longer narrows the same way).

    Example::

        runs = recent_runs(None, limit=100, empty="No runs yet.")
        if runs:
            st.dataframe(runs_frame(runs, ["Job", "Run ID", "Status"]))
    """
    try:
        runs = loader.list_runs(job, limit=limit, hidden_jobs=person.hidden_jobs() if person else (),
                                metrics=run_metrics.shared())
    except LoaderError as exc:
        show_error(exc)
        return []
    if person is not None:
        runs = [r for r in runs if person.may_view(r["etl_job_id"])]
    if not runs:
        st.info(empty, icon=":material/history:")
    return runs


def runs_frame(runs: Sequence[dict[str, Any]], columns: Sequence[str]) -> pd.DataFrame:
    """One row per run with ``columns`` in that order, times in the viewer's time zone.

    Columns: Open (the run's monitor path), Job, Run ID, Status, Started, Batches, Failed,
    Inserted, Updated, Validation fails.
    """
    zone = st.context.timezone
    return pd.DataFrame([_row(r, zone) for r in runs], columns=list(columns))


def _row(run: dict[str, Any], zone: str | None) -> dict[str, Any]:
    job, run_id = run["etl_job_id"], run["etl_run_id"]
    return {
        "Open": run_path(job, run_id),
        "Job": job, "Run ID": run_id, "Status": fmt.run_badge(run["status"]).label,
        "Started": fmt.local_time(run["started_at"], zone),
        # Before planning a run has no batches yet: said in words, never "None".
        "Batches": "not planned yet" if run["batches_total"] is None else fmt.fmt_int(run["batches_total"]),
        "Failed": run["batches_failed"], "Inserted": run["rows_inserted"], "Updated": run["rows_updated"],
        "Validation fails": run["validation_failures"],
    }
