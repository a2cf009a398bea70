"""/etl/data-loader: Run Configuration on the left, Run Monitor on the right."""

from __future__ import annotations

import uuid
from typing import Any

import streamlit as st

import loader
from loader import LoaderError, RunConflict, config
from ui import format as fmt
from ui.errors import show_error
from ui.grid_state import GridState, read_grid_state, rebuild_filters, rebuild_sort, url_value
from ui.layout import inject_css
from ui.monitor import empty_monitor, render_monitor
from ui.runs_table import recent_runs, runs_frame
from ui.text import alert, caption, md_code
from ui.validation import RunConfig, check_config, default_batch_size, valid_job_param, valid_run_param

DEDUP_NOTE = "Deduplication uses source_id; ON CONFLICT upsert updates data and updated_at"
ss = st.session_state


def _grid_state_from_url() -> GridState:
    """Batch status filter, grid sort and grid filter from the URL, rebuilt from the allow-list."""
    q = st.query_params
    return read_grid_state(q.get("status"), q.get("sort"), q.get("filter"))


def _init_state() -> list[str]:
    """First view of this session: job and run from the URL (deep links), fresh Run ID, default size."""
    notes = []
    if "dl_job" not in ss:
        raw_job, raw_run = st.query_params.get("job"), st.query_params.get("run")
        ss.dl_job = valid_job_param(raw_job)
        ss.dl_run = valid_run_param(raw_run) if ss.dl_job else None
        if raw_job and not ss.dl_job:
            notes.append("The link's job id is not valid; nothing to show for it.")
        elif raw_run and not ss.dl_run:
            notes.append("The link's run id is not valid (a UUID or a slug); nothing to show for it.")
        ss.dl_grid_url = _grid_state_from_url()
        notes.extend(ss.dl_grid_url.notes)
        # Shown as long as the page shows what the link asked for (not only on the first run).
        ss.dl_link_notes = ((ss.dl_job, ss.dl_run), notes)
    if "cfg_run_id" not in ss or ss.pop("dl_regen", False):
        ss.cfg_run_id = str(uuid.uuid4())
    linked, notes = ss.dl_link_notes
    return notes if (ss.dl_job, ss.dl_run) == linked else []


@st.cache_resource(ttl=10, show_spinner=False)
def _load_catalog(path: str) -> loader.Catalog:
    return loader.list_jobs(path)


def _catalog() -> loader.Catalog:
    """The job catalog, read again at most every 10 s (and whenever ETL_JOBS_FILE changes)."""
    return _load_catalog(str(config.jobs_file().resolve()))


def _on_job_change() -> None:
    ss.dl_job = ss.cfg_job
    ss.dl_run = None


def _active_run(job: str) -> dict[str, Any] | None:
    for r in loader.list_runs(job, limit=20):
        if r["status"] in fmt.ACTIVE:
            return r
    return None


def _start(cfg: RunConfig, force: bool) -> bool:
    try:
        ref = loader.start_run(cfg.job or "", run_id=cfg.run_id, batch_size=cfg.batch_size, force=force)
    except RunConflict:
        ss.dl_confirm = True
        return False
    except LoaderError as exc:
        ss.dl_start_error = str(exc)
        return False
    ss.dl_job, ss.dl_run = ref.etl_job_id, ref.etl_run_id
    ss.dl_regen = True
    ss.dl_toast = (f"Run started: {md_code(ref.etl_job_id)} / {md_code(ref.etl_run_id)} (batch size {ref.batch_size})",
                   ":material/rocket_launch:")
    return True


def _clear_confirm() -> None:
    ss.dl_confirm = False


@st.dialog("A run of this job is in progress", on_dismiss=_clear_confirm)
def _confirm_force(cfg: RunConfig, active: dict[str, Any] | None) -> None:
    if active:
        st.text(f"Run {active['etl_run_id']} of job {active['etl_job_id']} is still {active['status']}.")
    st.write("Starting another run now loads the same target table at the same time. "
             "Rows are upserted by source_id, so the later commit of a record wins.")
    with st.container(horizontal=True):
        if st.button("Start anyway", type="primary", key="dlg-force-yes"):
            ss.dl_confirm = False
            _start(cfg, force=True)
            st.rerun()
        if st.button("Don't start", key="dlg-force-no"):
            ss.dl_confirm = False
            st.rerun()


def _start_area(cfg: RunConfig) -> None:
    """The in-progress warning and Start Load: refreshed with the job's runs (a fragment)."""
    active = None
    if cfg.job and cfg.valid:
        try:
            active = _active_run(cfg.job)
        except LoaderError as exc:
            show_error(exc)
    if active:
        st.warning(f"Run {md_code(active['etl_run_id'])} of this job is {md_code(active['status'])}: "
                   "starting another one asks for confirmation.", icon=":material/warning:")
    why = None if cfg.valid else fmt.md_text("Fix the configuration first: " + "; ".join(cfg.problems.values()))
    if st.button("Start Load", type="primary", disabled=not cfg.valid, key="start-load", icon=":material/play_arrow:",
                 help=why):
        if active:
            ss.dl_confirm = True
        elif _start(cfg, force=False):
            st.rerun()
    if ss.get("dl_confirm"):  # stays open until answered or dismissed
        _confirm_force(cfg, active)
    if error := ss.pop("dl_start_error", None):
        alert(error, prefix="Start Load: ")


def _config_panel(catalog: loader.Catalog | None, catalog_error: str | None) -> None:
    st.subheader("Run Configuration", anchor=False)
    jobs = sorted(catalog.jobs) if catalog else []
    if catalog_error:
        alert(catalog_error)
    if "cfg_job" not in ss:
        ss.cfg_job = ss.dl_job if ss.dl_job in jobs else None
    elif ss.cfg_job is not None and ss.cfg_job not in jobs:
        ss.cfg_job = None
    job = st.selectbox(
        "ETL Job", jobs, key="cfg_job", placeholder="Type to filter the configured jobs", required=True,
        on_change=_on_job_change, filter_mode="fuzzy",
        format_func=lambda name: name, help="Jobs come from the catalog (ETL_JOBS_FILE)")
    if catalog is not None and not jobs:
        st.info("No jobs configured yet: add a [jobs.NAME] table to the catalog (ETL_JOBS_FILE).",
                icon=":material/inventory_2:")
    if catalog is not None and catalog.errors:
        with st.expander(f"{len(catalog.errors)} job(s) in the catalog are broken"):
            for name, err in catalog.errors.items():
                st.text(f"{name}: {err}")
    if job and catalog is not None and job in catalog.jobs:
        spec = catalog.jobs[job]
        caption(f"{spec.description or 'No description'} → {spec.target}")
    run_id = st.text_input("Run ID", key="cfg_run_id", max_chars=80, live=True,
                           help="A UUID (pre-filled) or a slug: a-z, 0-9, '-' and '_', at most 63 characters")
    run_id_message = st.empty()
    size_default, size_note = default_batch_size()
    if "cfg_batch" not in ss:
        ss.cfg_batch = size_default
    size = st.number_input("Batch Size", min_value=100, max_value=10_000, step=100, key="cfg_batch",
                           help="Env: ETL_BATCH_SIZE")
    batch_size_message = st.empty()
    cfg = check_config(job, run_id, size, jobs)
    # Each message right under its field (a missing job is said by the disabled Start's help).
    for field, slot in (("run_id", run_id_message), ("batch_size", batch_size_message)):
        if field in cfg.problems:
            with slot:
                alert(cfg.problems[field])
    if job is not None and "job" in cfg.problems:
        alert(cfg.problems["job"])
    if size_note:
        caption(f"ETL_BATCH_SIZE ignored: {size_note}")
    st.info(DEDUP_NOTE, icon=":material/info:")
    # Not on a timer: a fragment redrawn every few seconds would take the keyboard focus away. Start
    # Load checks for a run in progress when clicked, and the page reruns when the monitored run ends.
    st.fragment(_start_area)(cfg)
    st.divider()
    st.fragment(_runs_list)(job)


def _runs_list(job: str | None) -> None:
    st.markdown("##### Recent runs")
    if not job:
        st.caption("Choose a job to see its recent runs.")
        return
    runs = recent_runs(job, limit=20, empty="No runs yet for this job.")
    if not runs:
        return
    df = runs_frame(runs, ["Status", "Run ID", "Started", "Batches", "Failed", "Inserted", "Updated",
                           "Validation fails"])
    key = f"dl-runs:{job}"
    event = st.dataframe(df, hide_index=True, width="stretch", height=min(38 + 35 * len(runs), 300),
                         on_select="rerun", selection_mode="single-row", key=key)
    st.caption("Select a row to open that run in the monitor.")
    rows = event.selection.rows if event else []
    picked = runs[rows[0]]["etl_run_id"] if rows and rows[0] < len(runs) else None
    if picked and picked != ss.get("dl_picked"):
        ss.dl_picked = picked
        if (ss.dl_job, ss.dl_run) != (job, picked):
            ss.dl_job, ss.dl_run = job, picked
            st.rerun(scope="app")


def _sync_url(grid_state: dict[str, Any]) -> None:
    want: dict[str, str] = {}
    if ss.dl_job:
        want["job"] = ss.dl_job
    if ss.dl_job and ss.dl_run:
        want["run"] = ss.dl_run
        # The grid reports its state from the browser: rebuilt like a link's before it enters the URL.
        ignored: list[str] = []
        statuses = grid_state.get("status")
        sort = rebuild_sort(grid_state.get("sort"), ignored)
        filters = rebuild_filters(grid_state.get("filter"), ignored)
        if statuses:
            want["status"] = ",".join(statuses)
        if sort:
            want["sort"] = url_value(sort)
        if filters:
            want["filter"] = url_value(filters)
    if st.query_params.to_dict() != want:
        st.query_params.from_dict(want)


def main() -> None:
    inject_css()
    notes = _init_state()
    if toast := ss.pop("dl_toast", None):
        st.toast(toast[0], icon=toast[1])  # Markdown we wrote; ids inside are code spans
    st.title("Data Loader", anchor=False)
    for note in notes:
        st.info(fmt.md_text(note), icon=":material/link_off:")
    catalog, catalog_error = None, None
    try:
        catalog = _catalog()
    except LoaderError as exc:
        catalog_error = str(exc)
    with st.container(key="dl-layout"):
        left, right = st.columns([1, 2.4], gap="large")
        with left:
            _config_panel(catalog, catalog_error)
        with right:
            grid_state: dict[str, Any] = {}
            if ss.dl_job and ss.dl_run:
                url = ss.dl_grid_url
                grid_state = render_monitor(ss.dl_job, ss.dl_run, url.statuses, url.sort or None, url.filters or None)
            else:
                empty_monitor()
    _sync_url(grid_state)


main()
