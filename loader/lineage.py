"""OpenLineage RunEvents for run transitions, sent off the run's path by one small thread per process.

Why this shape: a lineage backend is someone else's server. A run must never wait for it, fail because
of it, or pay for it when nobody asked for lineage. So the hooks (:func:`run_event`) do nothing at all
unless OpenLineage is configured the standard way (a cheap look at the environment and two files; the
``openlineage`` package is never imported otherwise); when it is, the hook reads what the event needs
from the ledger (after the transition committed, in the caller, so the event describes that moment)
and hands it to a bounded queue. A daemon thread builds the event with the official client and sends
it once: a short timeout, no retries, one warning per event that could not be sent, events dropped
(and counted in one warning a minute) when the queue is full.

Hooks are called by whoever made the transition, only when its fenced change moved the run, so each
transition is reported once however many workers race for it. Delivery is at most once: an event still
queued when its process is killed is lost (a process that exits normally waits a few seconds for it).
"""

from __future__ import annotations

import atexit
import glob
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from psycopg.conninfo import conninfo_to_dict

from . import config, db
from .contract import run_contract
from .ledger import batches, events, runs
from .states import RunStatus

if TYPE_CHECKING:
    from openlineage.client.event_v2 import RunEvent

logger = logging.getLogger("dataloader")

#: Seconds one HTTP send may take (connect and answer) when OPENLINEAGE_URL configures the transport.
EMIT_TIMEOUT_SECONDS = 3.0
#: Events waiting to be sent in one process; beyond this they are dropped (a backend that is down
#: must not make a worker or the console hold an ever-growing backlog).
QUEUE_SIZE = 1000
#: Seconds a process that exits normally waits for its queued events (a CLI `start` sends its START).
FLUSH_AT_EXIT_SECONDS = EMIT_TIMEOUT_SECONDS + 1
#: job.namespace when OPENLINEAGE_NAMESPACE is unset.
DEFAULT_NAMESPACE = "dataloader"
#: The producer URI of every event and facet: this project has no public home to point at.
PRODUCER = "urn:dataloader-console"
#: The custom run facet's schema (its copy: schemas/openlineage/DataLoaderRunFacet.json).
RUN_FACET_SCHEMA_URL = "urn:dataloader-console:openlineage:1-0-0:DataLoaderRunFacet.json#/$defs/DataLoaderRunFacet"
#: Namespace of the UUIDs derived from a job and a run id that is not itself a UUID.
RUN_ID_NAMESPACE = uuid.UUID("5d0b7a52-3c1e-4d6f-9a57-6d8f0e1c2b3a")

#: Which OpenLineage eventType each run status reports (``loading`` depends on how it was reached).
EVENT_TYPES = {
    RunStatus.QUEUED.value: "START",
    RunStatus.SUCCESS.value: "COMPLETE",
    RunStatus.PARTIAL_SUCCESS.value: "COMPLETE",
    RunStatus.FAILED.value: "FAIL",
    RunStatus.CANCELED.value: "ABORT",
}


def configured() -> bool:
    """True when OpenLineage is configured the standard way and not disabled; cheap, imports nothing.

    The client's own rules: ``OPENLINEAGE_URL`` (HTTP transport), ``OPENLINEAGE_CONFIG`` or an
    ``openlineage.yml`` in the working directory or ``~/.openlineage/`` (any transport),
    ``OPENLINEAGE__TRANSPORT__*`` variables; ``OPENLINEAGE_DISABLED=true`` wins over all of them.
    """
    env = os.environ
    if env.get("OPENLINEAGE_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OPENLINEAGE_URL", "").strip() or env.get("OPENLINEAGE_CONFIG", "").strip():
        return True
    if any(k.startswith("OPENLINEAGE__TRANSPORT") for k in env):
        return True
    return _config_file() is not None


def _config_file() -> str | None:
    for path in (os.environ.get("OPENLINEAGE_CONFIG", ""), "openlineage.yml",
                 os.path.expanduser("~/.openlineage/openlineage.yml")):
        if path and os.path.isfile(path):
            return path
    return None


def prepare() -> None:
    """Import the client now when lineage is configured (a worker, as it starts), so that the first event
    does not import it (about a second of CPU) on the sender thread while batches load. No-op otherwise.
    """
    if configured():
        import openlineage.client.transport.http  # noqa: F401

        from . import _lineage_facet  # noqa: F401 - the client's events and facets


def run_event(job: str, run: str, status: str, *, moved: bool = True, retry: bool = False) -> None:
    """Report that run ``job/run`` moved to ``status``; call it after the transaction committed.

    ``moved``: what the fenced transition returned (nothing is reported when it did not move).
    ``retry``: the run went back to loading for a retry, which OpenLineage sees as a new run (START).
    Never raises and never waits for the backend: lineage must not fail or slow a run.

    Example::

        with db.connection() as conn, conn.transaction():
            moved = states.fail_queued(conn, job, run, message)
        lineage.run_event(job, run, "failed", moved=moved)
    """
    if not moved or not configured():
        return
    event_type = EVENT_TYPES.get(status)
    if status == RunStatus.LOADING.value:
        event_type = "START" if retry else "RUNNING"
    if event_type is None:
        return
    try:
        snap = snapshot(job, run, status, event_type)
    except Exception as exc:  # noqa: BLE001 - the database may be away right after the commit
        logger.warning("lineage: %s event of %s/%s not sent: the ledger could not be read: %s",
                       event_type, job, run, db.redact(str(exc)))
        return
    _sender().submit(snap)


@contextmanager
def after_commit(job: str, run: str) -> Iterator[_Pending]:
    """Report the status set with ``pending.moved_to(...)`` once the transaction inside has committed.

    For code that returns from inside its transaction: put it outside ``conn.transaction()`` in the same
    ``with``, so it exits after the commit; an exception (a rollback) reports nothing.

    Example::

        with db.connection() as conn, lineage.after_commit(job, run) as pending, conn.transaction():
            states.cancel_run(conn, job, run)
            pending.moved_to("canceled")
    """
    pending = _Pending()
    yield pending
    if pending.status is not None:
        run_event(job, run, pending.status)


@dataclass
class _Pending:
    status: str | None = None

    def moved_to(self, status: str) -> None:
        self.status = status


@dataclass(frozen=True)
class InputFile:
    """A source file of the run, with what validation found in its records."""

    path: str
    records: int | None = None
    required_field_errors: int = 0
    json_shape_errors: int = 0


@dataclass(frozen=True)
class Snapshot:
    """What one event says, read from the ledger right after the transition (plain data: no client)."""

    event_type: str
    event_time: str
    job: str
    run: str
    status: str
    retry: int
    batch_size: int
    forced: bool
    source: str
    target_schema: str
    target_table: str
    inputs: tuple[InputFile, ...]
    metrics: dict[str, Any]
    rows_written: int
    error_code: str | None
    error_message: str | None
    started_by: str | None = None
    config_key: tuple[str, ...] = field(default=())


def snapshot(job: str, run: str, status: str, event_type: str) -> Snapshot:
    """Read the run as it is now: the contract's metrics, its files' validation counts, its retries."""
    event_time = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    contract = run_contract(job, run, include_batches=False)
    b = batches.c
    key = sa.and_(b.etl_job_id == job, b.etl_run_id == run)
    with db.get_engine().connect() as conn:
        spec = conn.execute(sa.select(runs.c.spec).where(
            runs.c.etl_job_id == job, runs.c.etl_run_id == run)).scalar_one()
        files = conn.execute(sa.select(
            b.source_file, sa.func.sum(b.rows_attempted), sa.func.sum(b.required_field_errors),
            sa.func.sum(b.json_shape_errors)).where(key).group_by(b.source_file)
            .order_by(sa.func.min(b.batch_index))).all()
        retries = conn.execute(sa.select(sa.func.count()).where(
            events.c.etl_job_id == job, events.c.etl_run_id == run,
            events.c.event == "retry_requested")).scalar_one()
    inputs = tuple(InputFile(str(f), int(n or 0), int(req or 0), int(shape or 0)) for f, n, req, shape in files)
    source = str(spec["source"])
    if not inputs and not glob.has_magic(source):
        inputs = (InputFile(source),)  # not planned yet (or planning failed): the file the job names
    m = contract["metrics"]
    return Snapshot(
        event_type=event_type, event_time=event_time, job=job, run=run, status=status, retry=int(retries),
        batch_size=int(contract["batch_size"]), forced=bool(contract["forced"]), source=source,
        target_schema=str(spec["target_schema"]), target_table=str(spec["target_table"]), inputs=inputs,
        metrics={**m, **{k: contract["validation_summary"][k] for k in ("required_field_errors",
                                                                         "json_shape_errors")}},
        rows_written=int(m["rows_inserted"]) + int(m["rows_updated"]),
        error_code=contract["error_code"], error_message=_error_message(contract),
        started_by=contract["started_by"], config_key=_config_key())


def _error_message(contract: dict[str, Any]) -> str | None:
    if contract["status"] != RunStatus.FAILED.value:
        return None
    if contract["error_message"]:
        return db.redact(str(contract["error_message"]))
    m = contract["metrics"]
    return f"{m['batches_failed']} of {m['batches_total']} batches failed"


def _config_key() -> tuple[str, ...]:
    """What the client's configuration depends on: a change (a test's new server) makes a new client."""
    return tuple(sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("OPENLINEAGE"))) + (
        _config_file() or "",)


def run_uuid(job: str, run: str, retry: int = 0) -> str:
    """OpenLineage's runId: the run id when it is a UUID, else one derived from job and run (stable).

    A retry is a new OpenLineage run (its first attempt ended with a terminal event): its id is derived
    from job, run and the retry's number.

    Example::

        >>> run_uuid("orders", "0b5e1f6a-6f0e-4a4e-9d43-3b1f0c3f7e11")
        '0b5e1f6a-6f0e-4a4e-9d43-3b1f0c3f7e11'
    """
    if retry == 0:
        try:
            return str(uuid.UUID(run))
        except ValueError:
            pass
    parts = [job, run] + ([f"retry-{retry}"] if retry else [])
    return str(uuid.uuid5(RUN_ID_NAMESPACE, json.dumps(parts)))


def source_dataset(path: str) -> tuple[str, str]:
    """(namespace, name) of a source as OpenLineage's naming conventions say.

    Local file system: ``file`` and the absolute path; an object store URL: ``<scheme>://<bucket>`` and
    the key (``s3://bucket`` + ``key``, ``gs://``, ...); a remote ``file://host/path``: ``file://host``.

    Example::

        >>> source_dataset("s3://bucket/in/orders.ndjson")
        ('s3://bucket', 'in/orders.ndjson')
    """
    if "://" not in path:
        return "file", os.path.abspath(path)
    parts = urlsplit(path)
    if parts.scheme == "file" and parts.netloc in ("", "localhost"):
        return "file", parts.path
    host = parts.hostname or ""  # never the user or password a URL may carry
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}", parts.path.lstrip("/")


def table_dataset(schema: str, table: str) -> tuple[str, str]:
    """(``postgres://host:port``, ``database.schema.table``) of a staging table; never the password."""
    info = conninfo_to_dict(db.libpq_url(config.database_url()))
    host = str(info.get("host") or "localhost").split(",")[0]
    if host.startswith("/"):
        host = "localhost"  # a Unix socket directory is no host name
    port = str(info.get("port") or "5432").split(",")[0]
    database = str(info.get("dbname") or info.get("user") or "postgres")
    return f"postgres://{host}:{port}", f"{database}.{schema}.{table}"


def build_event(snap: Snapshot) -> RunEvent:
    """The RunEvent of a snapshot, with the official client's classes (imported only here)."""
    from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
    from openlineage.client.facet_v2 import (
        data_quality_assertions_dataset,
        error_message_run,
        job_type_job,
        output_statistics_output_dataset,
    )

    from ._lineage_facet import DataLoaderRunFacet

    run_facets: dict[str, Any] = {"dataloader": DataLoaderRunFacet(
        etl_job_id=snap.job, etl_run_id=snap.run, status=snap.status, batch_size=snap.batch_size,
        retry=snap.retry, forced=snap.forced, metrics=snap.metrics, error_code=snap.error_code,
        started_by=snap.started_by, producer=PRODUCER)}
    if snap.error_message is not None:
        run_facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
            message=snap.error_message, programmingLanguage="python", producer=PRODUCER)
    inputs = []
    for f in snap.inputs:
        namespace, name = source_dataset(f.path)
        input_facets: dict[str, Any] = {}
        if f.records is not None:
            assertion = data_quality_assertions_dataset.Assertion
            input_facets["dataQualityAssertions"] = data_quality_assertions_dataset.DataQualityAssertionsDatasetFacet(
                assertions=[
                    assertion(assertion="required_fields", success=f.required_field_errors == 0, severity="warn",
                              expected="0", actual=str(f.required_field_errors),
                              description="records missing a required field, or with it null"),
                    assertion(assertion="json_shape", success=f.json_shape_errors == 0, severity="warn",
                              expected="0", actual=str(f.json_shape_errors),
                              description="lines that are not a JSON object the table can store"),
                ], producer=PRODUCER)
        inputs.append(InputDataset(namespace=namespace, name=name, inputFacets=input_facets or None))
    namespace, name = table_dataset(snap.target_schema, snap.target_table)
    output = OutputDataset(namespace=namespace, name=name, outputFacets={
        "outputStatistics": output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
            rowCount=snap.rows_written, producer=PRODUCER)})
    job_facets: dict[str, Any] = {"jobType": job_type_job.JobTypeJobFacet(
        processingType="BATCH", integration="DATALOADER", jobType="JOB", producer=PRODUCER)}
    return RunEvent(
        eventType=RunState(snap.event_type), eventTime=snap.event_time, producer=PRODUCER,
        run=Run(runId=run_uuid(snap.job, snap.run, snap.retry), facets=run_facets),
        job=Job(namespace=os.environ.get("OPENLINEAGE_NAMESPACE", "").strip() or DEFAULT_NAMESPACE,
                name=snap.job, facets=job_facets),
        inputs=inputs, outputs=[output])


class _Sender:
    """One daemon thread per process sends the queued events, one at a time, each once."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.queue: queue.Queue[Snapshot] = queue.Queue(maxsize=QUEUE_SIZE)
        self._client: tuple[tuple[str, ...], Any] | None = None
        self._dropped = 0
        self._last_drop_log = 0.0
        threading.Thread(target=self._loop, name="openlineage-sender", daemon=True).start()

    def submit(self, snap: Snapshot) -> None:
        try:
            self.queue.put_nowait(snap)
        except queue.Full:
            self._dropped += 1
            if time.monotonic() - self._last_drop_log >= 60:
                self._last_drop_log = time.monotonic()
                logger.warning("lineage: %d event(s) dropped: %d are waiting for a backend that does not answer",
                               self._dropped, QUEUE_SIZE)

    def _loop(self) -> None:
        while True:
            snap = self.queue.get()
            try:
                self._send(snap)
            except Exception as exc:  # noqa: BLE001 - a down or refusing backend is logged, never raised
                logger.warning("lineage: %s event of %s/%s not sent: %s", snap.event_type, snap.job, snap.run,
                               db.redact(f"{type(exc).__name__}: {exc}"))
            finally:
                self.queue.task_done()

    def _send(self, snap: Snapshot) -> None:
        if self._client is None or self._client[0] != snap.config_key:
            self._client = (snap.config_key, _make_client())
        self._client[1].emit(build_event(snap))

    def flush(self, timeout: float) -> bool:
        """Wait until every queued event was sent or given up on; False when ``timeout`` ran out first."""
        deadline = time.monotonic() + timeout
        with self.queue.all_tasks_done:
            while self.queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.queue.all_tasks_done.wait(left)
        return True


def _make_client() -> Any:
    """The transport the standard configuration names; OPENLINEAGE_URL alone gets a bounded HTTP one.

    A configuration file or ``OPENLINEAGE__TRANSPORT__*`` variables are the user's choice of transport,
    timeout and retries: the client resolves them. ``OPENLINEAGE_URL`` alone would get the client's
    default HTTP transport, which retries five times with backoff; ours tries once, for at most
    :data:`EMIT_TIMEOUT_SECONDS`. The client's git facet is off: a worker's working directory says
    nothing about the job, and a remote URL may carry a token.
    """
    from openlineage.client import OpenLineageClient
    from openlineage.client.transport.http import HttpConfig, HttpTransport

    env = os.environ
    if _config_file() is None and not any(k.startswith("OPENLINEAGE__TRANSPORT") for k in env):
        settings: dict[str, Any] = {"url": env["OPENLINEAGE_URL"].strip(), "timeout": EMIT_TIMEOUT_SECONDS,
                                    "retry": {"total": 0, "connect": 0, "read": 0, "status": 0}}
        if env.get("OPENLINEAGE_ENDPOINT"):
            settings["endpoint"] = env["OPENLINEAGE_ENDPOINT"]
        if env.get("OPENLINEAGE_API_KEY"):
            settings["auth"] = {"type": "api_key", "apiKey": env["OPENLINEAGE_API_KEY"]}
        return HttpTransport(HttpConfig.from_dict(settings))  # emit(event), as the client would call it
    return OpenLineageClient(config={"facets": {"source_code_location": {"disabled": True}}})


_lock = threading.Lock()
_current: _Sender | None = None


def _sender() -> _Sender:
    """This process's sender (a new one after fork: the parent's thread does not exist in the child)."""
    global _current
    with _lock:
        if _current is None or _current.pid != os.getpid():
            first = _current is None
            _current = _Sender()
            if first:
                atexit.register(_flush_at_exit)
        return _current


def flush(timeout: float = FLUSH_AT_EXIT_SECONDS) -> bool:
    """Wait for this process's queued events (tests, and a CLI command before it exits)."""
    sender = _current
    return True if sender is None or sender.pid != os.getpid() else sender.flush(timeout)


def _flush_at_exit() -> None:
    flush(FLUSH_AT_EXIT_SECONDS)
