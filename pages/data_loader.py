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
from ui.identity import OPERATORS_ONLY, operator_label, page_person, session_person
from ui.layout import inject_css
from ui.monitor import REFRESH_SECONDS, empty_monitor, not_found_monitor, render_monitor
from ui.routes import run_path
from ui.run_toasts import expect_start
from ui.runs_table import recent_runs, runs_frame
from ui.text import alert, caption, md_code
from ui.validation import (
    RunConfig,
    batch_size_default,
    check_config,
    run_id_taken,
    valid_job_param,
    valid_run_param,
)

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


def _job_batch_size(job: str | None) -> int | None:
    """The job's own ``batch_size`` from the catalog (None when it sets none or the catalog is unreadable)."""
    if not job:
        return None
    try:
        spec = _catalog().jobs.get(job)
    except LoaderError:
        return None
    return spec.batch_size if spec is not None else None


def _on_job_change() -> None:
    ss.dl_job = ss.cfg_job
    ss.dl_run = None
    ss.dl_confirm = None
    # The job's own batch size, as the CLI would use it (else ETL_BATCH_SIZE, else 1000).
    ss.cfg_batch = batch_size_default(ss.cfg_job, _job_batch_size(ss.cfg_job)).value


def _start(cfg: RunConfig, force: bool) -> bool:
    """Start the run; the engine's own check (one transaction) decides whether a run is in progress.

    The person's role is read again here, at the click, whatever the button showed.
    """
    person = session_person()
    if not person.may_operate(cfg.job or ""):
        ss.dl_start_error = f"{OPERATORS_ONLY}: you may look at this job's runs but not start one."
        return False
    try:
        ref = loader.start_run(cfg.job or "", run_id=cfg.run_id, batch_size=cfg.batch_size, force=force,
                               actor=person.actor)
    except RunConflict as exc:
        if loader.find_run(cfg.job or "", cfg.run_id) is not None:
            # The Run ID was taken meanwhile: said under the field by the full rerun, never the dialog.
            ss.dl_confirm = None
            ss.dl_start_error = str(exc)
            st.rerun(scope="app")
        ss.dl_confirm = cfg.job  # a run of the job is in progress: ask (the dialog shows it while it lasts)
        return False
    except LoaderError as exc:
        ss.dl_start_error = str(exc)
        return False
    ss.dl_job, ss.dl_run = ref.etl_job_id, ref.etl_run_id
    expect_start(ref.etl_job_id, ref.etl_run_id)
    ss.dl_regen = True
    ss.dl_toast = (f"Run started: {md_code(ref.etl_job_id)} / {md_code(ref.etl_run_id)} (batch size {ref.batch_size})",
                   ":material/rocket_launch:")
    return True


def _clear_confirm() -> None:
    ss.dl_confirm = None


#: What the force dialog says about two runs writing one table (README, "The job catalog").
FORCE_NOTE = ("Starting another run now loads the same target table at the same time. Rows are upserted by "
              "source_id; when both runs hold a record, the later-started run's wins (within a run, the later "
              "position in the source), whatever order their batches commit in.")


@st.dialog("A run of this job is in progress", on_dismiss=_clear_confirm)
def _confirm_force(cfg: RunConfig, active: dict[str, Any]) -> None:
    st.text(f"Run {active['etl_run_id']} of job {active['etl_job_id']} is {active['status']}.")
    st.write(FORCE_NOTE)
    with st.container(horizontal=True):
        if st.button("Start anyway", type="primary", key="dlg-force-yes"):
            ss.dl_confirm = None
            _start(cfg, force=True)
            st.rerun()
        if st.button("Don't start", key="dlg-force-no"):
            ss.dl_confirm = None
            st.rerun()


def _active_run(job: str | None) -> dict[str, Any] | None:
    """The job's run in progress, read from the ledger now (one index lookup)."""
    if not job:
        return None
    try:
        return loader.active_run(job)
    except LoaderError as exc:
        show_error(exc)
        return None


def _job_warning(job: str | None) -> None:
    """'Run … of this job is <status>' as the ledger says now: a timed fragment of its own that holds no
    control, so its redraws never move the keyboard focus."""
    active = _active_run(job)
    if active:
        st.warning(f"Run {md_code(active['etl_run_id'])} of this job is {md_code(active['status'])}: "
                   "starting another one asks for confirmation.", icon=":material/warning:")


def _start_area(cfg: RunConfig) -> None:
    """Start Load and the confirmation dialog (a fragment: a click reruns only this)."""
    why = None if cfg.valid else fmt.md_text("Fix the configuration first: " + "; ".join(cfg.problems.values()))
    operator = cfg.job is None or page_person().may_operate(cfg.job)
    if st.button(operator_label("Start Load", operator), type="primary", disabled=not cfg.valid or not operator,
                 key="start-load", icon=":material/play_arrow:", help=why):
        ss.dl_confirm = None
        if _start(cfg, force=False):
            st.rerun()
    if ss.get("dl_confirm"):
        # Shown only while a run of the job really is in progress (read again at each redraw): a run
        # that ended before the answer closes the dialog, and Start Load starts at the next click.
        active = _active_run(cfg.job) if ss.dl_confirm == cfg.job and cfg.valid else None
        if active:
            _confirm_force(cfg, active)
        else:
            ss.dl_confirm = None
            alert("The run in progress has ended: nothing was started. Start Load starts the run now.", "info")
    if error := ss.pop("dl_start_error", None):
        alert(error, prefix="Start Load: ")


def _config_panel(catalog: loader.Catalog | None, catalog_error: str | None) -> None:
    st.header("Run Configuration", anchor=False)
    person = page_person()
    # A job the person may not view appears nowhere: not here, not in the runs lists, not from a link.
    jobs = sorted(j for j in catalog.jobs if person.may_view(j)) if catalog else []
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
    if catalog is not None and catalog.errors and person.may_see_broken_jobs():
        with st.expander(f"{len(catalog.errors)} job(s) in the catalog are broken"):
            for name, err in catalog.errors.items():
                st.text(f"{name}: {err}")
    if job and catalog is not None and job in catalog.jobs:
        spec = catalog.jobs[job]
        caption(f"{spec.description or 'No description'} → {spec.target}")
    run_id = st.text_input("Run ID", key="cfg_run_id", max_chars=80, live=True,
                           help="A UUID (pre-filled) or a slug: a-z, 0-9, '-' and '_', at most 63 characters")
    run_id_message = st.empty()
    size_default = batch_size_default(job, _job_batch_size(job))
    if "cfg_batch" not in ss:
        ss.cfg_batch = size_default.value
    # No min/max on the widget: it would keep the last valid value and start with it. Every value
    # reaches check_config, which disables Start and says why under the field.
    size = st.number_input("Batch Size", value=None, step=100, key="cfg_batch", placeholder="100 to 10000",
                           help="Env: ETL_BATCH_SIZE")
    caption(size_default.helper)
    batch_size_message = st.empty()
    cfg = check_config(job, run_id, size, jobs)
    if cfg.job and "run_id" not in cfg.problems and "job" not in cfg.problems:
        try:
            found = loader.find_run(cfg.job, cfg.run_id)
        except LoaderError as exc:
            show_error(exc)
            found = None
        started = fmt.local_time(found["started_at"], st.context.timezone) if found else ""
        cfg = run_id_taken(cfg, found, started)
        taken_link = ("Open that run", run_path(cfg.job, cfg.run_id)) if found else None
    else:
        taken_link = None
    # Each message right under its field (a missing job is said by the disabled Start's help).
    for field, slot in (("run_id", run_id_message), ("batch_size", batch_size_message)):
        if field in cfg.problems:
            with slot:
                alert(cfg.problems[field], link=taken_link if field == "run_id" else None)
    if job is not None and "job" in cfg.problems:
        alert(cfg.problems["job"])
    if size_default.env_note:
        caption(f"ETL_BATCH_SIZE ignored: {size_default.env_note}")
    st.info(DEDUP_NOTE, icon=":material/info:")
    st.fragment(_job_warning, run_every=REFRESH_SECONDS)(cfg.job if "job" not in cfg.problems else None)
    # Not on a timer: a fragment redrawn every few seconds would take the keyboard focus away. Start
    # Load asks the engine when clicked, and the page reruns when the monitored run ends.
    st.fragment(_start_area)(cfg)
    st.divider()
    # Timed, like the Recent runs page: statuses and counts follow the ledger (a selection survives).
    st.fragment(_runs_list, run_every=REFRESH_SECONDS)(job)


def _runs_list(job: str | None) -> None:
    st.subheader("Recent runs", anchor=False)
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
        left, right = st.columns([1, 2.6], gap="large")
        with left:
            _config_panel(catalog, catalog_error)
        with right:
            grid_state: dict[str, Any] = {}
            if ss.dl_job and ss.dl_run and not page_person().may_view(ss.dl_job):
                not_found_monitor(ss.dl_job, ss.dl_run)  # said exactly as for a run that does not exist
            elif ss.dl_job and ss.dl_run:
                url = ss.dl_grid_url
                grid_state = render_monitor(ss.dl_job, ss.dl_run, url.statuses, url.sort or None, url.filters or None)
            else:
                empty_monitor()
    _sync_url(grid_state)


main()
