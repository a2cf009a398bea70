"""The runs tables under Streamlit's AppTest: Recent runs (every job) and the Data Loader's (the chosen job)."""

from __future__ import annotations

import pytest

import loader

from .conftest import ROOT

pytestmark = pytest.mark.usefixtures("ledger")

HOME = str(ROOT / "Home.py")  # the navigation, whose default page is Recent runs


def test_recent_runs_lists_the_newest_first_with_a_link_to_its_monitor(demo, idle_queue):
    from streamlit.testing.v1 import AppTest

    loader.start_run(demo.job, run_id="older")
    loader.cancel_run(demo.job, "older")
    loader.start_run(demo.job, run_id="newer")
    at = AppTest.from_file(HOME, default_timeout=30).run()
    assert not at.exception
    df = at.dataframe[0].value
    assert list(df.columns) == ["Open", "Job", "Run ID", "Status", "Started", "Batches", "Failed", "Inserted",
                                "Updated"]
    top = df.head(2).to_dict("records")
    assert [r["Run ID"] for r in top] == ["newer", "older"]
    assert [r["Status"] for r in top] == ["Queued", "Canceled"]
    assert top[0]["Open"] == f"/etl/data-loader/{demo.job}/newer"
    loader.cancel_run(demo.job, "newer")


def test_the_data_loader_lists_the_chosen_jobs_runs_under_its_configuration(page, demo, idle_queue):
    loader.start_run(demo.job, run_id="listed")
    at = page.run()
    at.selectbox(key="cfg_job").select(demo.job).run()
    assert not at.exception
    df = at.dataframe(key=f"dl-runs:{demo.job}").value
    assert list(df.columns) == ["Status", "Run ID", "Started", "Batches", "Failed", "Inserted", "Updated",
                                "Validation fails"]
    assert df.to_dict("records")[0]["Run ID"] == "listed" and df.to_dict("records")[0]["Status"] == "Queued"
    loader.cancel_run(demo.job, "listed")


def test_a_run_not_planned_yet_says_so_instead_of_none(page, demo, idle_queue):
    loader.start_run(demo.job, run_id="unplanned")  # nobody plans it: no batches yet
    at = page.run()
    at.selectbox(key="cfg_job").select(demo.job).run()
    row = at.dataframe(key=f"dl-runs:{demo.job}").value.to_dict("records")[0]
    assert row["Batches"] == "not planned yet"
    loader.cancel_run(demo.job, "unplanned")
