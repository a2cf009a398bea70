"""The operations people run, from the CLI, a notebook or the console: start, watch, retry, cancel."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import orjson
import psycopg
from psycopg import sql

from . import audit, db, ledger, runs
from .catalog import Catalog, load_catalog
from .contract import run_contract, run_status
from .errors import LoaderError, ServiceError
from .ledger import FINAL_RUN_STATES
from .runs import RunRef
from .states import RUN_END_CHANNEL


def initdb(url: str | None = None) -> int:
    """Create or upgrade the ledger schema (idempotent); returns its version."""
    return ledger.initdb(url)


def list_jobs(catalog: str | Path | Catalog | None = None) -> Catalog:
    """The configured jobs (and, separately, the broken ones with their error)."""
    return catalog if isinstance(catalog, Catalog) else load_catalog(catalog)


def start_run(job: str, *, run_id: str | None = None, batch_size: int | None = None, force: bool = False,
              catalog: str | Path | Catalog | None = None, actor: str | None = None) -> RunRef:
    """Start a run of ``job``: it is queued at once and its lineage returned.

    Refuses (RunConflict) while the job has a run in progress, unless ``force=True``. ``actor`` is who
    starts it (the run's ``started_by`` and its audit trail); None: ``ETL_ACTOR``, else the OS user name.

    Example::

        ref = start_run("orders", batch_size=1000, actor="ana@example.com")
        print(ref.etl_job_id, ref.etl_run_id)
    """
    from .queue import enqueue_plan  # RQ is imported when a run is queued, not with the API

    spec = list_jobs(catalog).get(job)
    ref = runs.create_run(spec, actor=audit.actor_or_default(actor), run_id=run_id, batch_size=batch_size,
                          force=force)
    try:
        enqueue_plan(ref.etl_job_id, ref.etl_run_id)
    except ServiceError as exc:
        runs.fail_queued_run(ref.etl_job_id, ref.etl_run_id, str(exc))
        raise
    return ref


def cancel_run(job: str, run: str, *, actor: str | None = None) -> str:
    """Cancel an active run; returns 'canceled', or the run's final state when every batch had already
    ended (the run then finishes as its batches say: see ``runs.cancel``). ``actor`` as for ``start_run``."""
    return runs.cancel(job, run, actor=audit.actor_or_default(actor)).status


def retry_run(job: str, run: str, batches: list[int] | None = None, *, actor: str | None = None) -> list[int]:
    """Re-run the failed batches (all, or those listed) of a failed or partial_success run.

    Returns the batch indexes queued again. ``actor`` as for ``start_run``.
    """
    from .queue import enqueue_batches

    deliveries = runs.reset_failed_batches(job, run, batches, actor=audit.actor_or_default(actor))
    indexes = sorted(deliveries)
    enqueue_batches(job, run, indexes, trigger="manual", deliveries=deliveries)
    return indexes


#: Seconds between two contracts handed to ``wait_for_run``'s ``on_progress`` while the run goes on.
PROGRESS_SECONDS = 0.5


def wait_for_run(job: str, run: str, *, timeout: float | None = None, poll: float = 0.1,
                 on_progress: Callable[[dict[str, Any]], None] | None = None,
                 progress: bool = False) -> dict[str, Any]:
    """Block until the run reaches a final state; returns its contract.

    Hears the run's end at once (the ledger's notification on ``dataloader_run_end``, on a connection of its
    own) and reads the run's status every LISTENING_POLL seconds meanwhile; where it cannot listen, it reads
    the status every ``poll`` seconds (one row). The full contract, which sums every
    batch of the run, is read only for ``on_progress`` (at most every PROGRESS_SECONDS, when the
    run changed) and once at the end. ``progress``: show a progress bar meanwhile (tqdm: a widget in
    Jupyter, a text bar on stderr elsewhere). Raises TimeoutError after ``timeout`` seconds.

    Example::

        contract = wait_for_run("orders", ref.etl_run_id, timeout=600, progress=True)
    """
    if progress:
        from .progress import RunProgress

        bar = RunProgress(job, run)

        def show(contract: dict[str, Any]) -> None:
            bar.update(contract)
            if on_progress is not None:
                on_progress(contract)

        try:
            return wait_for_run(job, run, timeout=timeout, poll=poll, on_progress=show)
        finally:
            bar.close()
    deadline = None if timeout is None else time.monotonic() + timeout
    final = {s.value for s in FINAL_RUN_STATES}
    seen = -1
    next_progress = 0.0
    with _RunEndListener(job, run) as ends:
        while True:
            status = run_status(job, run)
            if on_progress is not None and (status in final or time.monotonic() >= next_progress):
                next_progress = time.monotonic() + PROGRESS_SECONDS
                contract = run_contract(job, run, include_batches=False)
                if contract["version"] != seen:
                    seen = contract["version"]
                    on_progress(contract)
            if status in final:
                return run_contract(job, run)
            now = time.monotonic()
            if deadline is not None and now > deadline:
                raise TimeoutError(f"run {job}/{run} still {status} after {timeout} s")
            # Told at once when the run ends; the status is still read now and then, in case a notification
            # is lost (the listening connection broke) and to show progress.
            pause = LISTENING_POLL if ends.listening else poll
            if on_progress is not None:
                pause = min(pause, max(0.0, next_progress - now))
            if deadline is not None:
                pause = min(pause, max(0.0, deadline - now))
            ends.wait(pause)


#: Seconds between two reads of a run's status while its end is listened for (ledger 0007's notification).
LISTENING_POLL = 1.0


class _RunEndListener:
    """The end of one run, heard on :data:`~loader.states.RUN_END_CHANNEL` on a connection of its own.

    ``wait(seconds)`` returns when the run's end is announced or the time is up. Where listening is not
    possible (the connection fails or breaks), ``listening`` is False and ``wait`` just sleeps: the caller
    then polls at its own pace.
    """

    def __init__(self, job: str, run: str) -> None:
        self._key = {"schema": db.ledger_schema(), "job": job, "run": run}
        self._stack = ExitStack()
        self._conn: psycopg.Connection[Any] | None = None

    @property
    def listening(self) -> bool:
        """True while notifications can be heard (else ``wait`` only sleeps)."""
        return self._conn is not None

    def __enter__(self) -> _RunEndListener:
        try:
            conn = self._stack.enter_context(db.dedicated_connection(application_name="dataloader-wait"))
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(RUN_END_CHANNEL)))
            self._conn = conn
        except (LoaderError, psycopg.Error):
            self._close()
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        self._conn = None
        self._stack.close()

    def wait(self, seconds: float) -> None:
        if self._conn is None:
            time.sleep(seconds)
            return
        end = time.monotonic() + seconds
        try:
            while (left := end - time.monotonic()) > 0:
                for note in self._conn.notifies(timeout=left, stop_after=1):
                    try:
                        said = orjson.loads(note.payload)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(said, dict) and all(said.get(k) == v for k, v in self._key.items()):
                        return
        except psycopg.Error:
            self._close()  # broken: from now on the caller polls
            time.sleep(max(0.0, end - time.monotonic()))


def workers_alive() -> int:
    """How many workers listen on the loader's queue (0: nobody will process the run).

    Read from the ledger's heartbeats, which survive a Redis flush, not from RQ's registry.
    """
    from .reconcile import live_workers  # the worker side of the engine loads with the first call

    return live_workers()
