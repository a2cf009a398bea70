"""The worker entry: RQ workers that run batches in-process, beat in the ledger and reconcile."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

import psycopg
from redis import Redis, RedisError
from redis.client import Pipeline
from rq import SimpleWorker
from rq.exceptions import StopRequested
from rq.timeouts import JobTimeoutException, UnixSignalDeathPenalty
from rq.worker_pool import WorkerPool

from loader import config, db, ledger, loading
from loader.errors import JobTimeout, TransientDbError
from loader.events import setup_process_logging
from loader.queue import get_queue, get_redis
from loader.reconcile import beat, forget

from .reconciler import reconcile_once

logger = logging.getLogger("dataloader")

#: Seconds between two heartbeats of a worker in the ledger.
HEARTBEAT_SECONDS = 3.0
#: A heartbeat statement that takes longer than this (ms) is abandoned and tried again.
HEARTBEAT_TIMEOUT_MS = 2000
#: Seconds between two reconcile passes (each worker tries; one at a time runs).
RECONCILE_SECONDS = 5.0
#: First and longest wait (seconds, doubling) before a worker loop that ended on an error (Redis
#: unreachable or restarted) is replaced by a new one.
RESTART_MIN_SECONDS = 1.0
RESTART_MAX_SECONDS = 30.0
#: A worker loop that lasted this long (seconds) before ending starts the backoff over.
RESTART_RESET_SECONDS = 60.0


class JobTimedOut(JobTimeout, JobTimeoutException):
    """ETL_JOB_TIMEOUT passed: the loader records the attempt as its own transient error (``job_timeout``),
    RQ sees its own timeout exception and ends the job."""


class _TimeoutPenalty(UnixSignalDeathPenalty):
    """RQ's SIGALRM job timeout, raising JobTimedOut instead of RQ's plain exception."""

    def __init__(self, timeout: int, exception: type[Exception] = JobTimeoutException, **kwargs: Any) -> None:
        super().__init__(timeout, JobTimedOut, **kwargs)  # type: ignore[no-untyped-call]


class LedgerWorker(SimpleWorker):
    """An RQ SimpleWorker that also beats in the ledger and reconciles, each from a thread of its own.

    ``SimpleWorker`` runs each job in the worker process itself instead of forking a child per job,
    so the PostgreSQL pool and the compiled JSON Schema survive from one batch to the next.
    The heartbeat lives in PostgreSQL (not only in Redis): a worker killed mid-batch is noticed
    within seconds, and a Redis flush does not make live workers look dead. It names the batch the worker
    is executing, and runs on its own thread and connection: a reconcile pass stuck on a Redis or a
    database that stopped answering can never make a live worker look dead.
    """

    #: Set when SIGTERM / SIGINT asked this worker to stop (RQ's own flag misses an idle worker's stop).
    stop_asked = False
    death_penalty_class = _TimeoutPenalty

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop_asked = True
        super().request_stop(signum, frame)  # type: ignore[no-untyped-call]

    def heartbeat(self, timeout: int | None = None, pipeline: Pipeline | None = None) -> None:
        """RQ's worker heartbeat (HSET and two EXPIREs), in one round trip instead of three.

        RQ beats about three times per job outside a pipeline: this saves about 0.5 ms of each
        batch's RQ bookkeeping (measured with no-op jobs: 3.7 -> 3.2 ms per job).
        """
        if pipeline is not None:
            super().heartbeat(timeout, pipeline)
            return
        with self.connection.pipeline(transaction=False) as pipe:
            super().heartbeat(timeout, pipe)
            pipe.execute()

    def work(self, *args: Any, **kwargs: Any) -> bool:
        stop = threading.Event()
        threads = [threading.Thread(target=self._heartbeat_loop, args=(stop,), name="dataloader-heartbeat",
                                    daemon=True),
                   threading.Thread(target=self._reconcile_loop, args=(stop,), name="dataloader-reconciler",
                                    daemon=True)]
        for thread in threads:
            thread.start()
        try:
            return bool(super().work(*args, **kwargs))
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=5)

    def _heartbeat_loop(self, stop: threading.Event) -> None:
        """Beat every HEARTBEAT_SECONDS on a connection of its own (statement timeout: a beat never hangs)."""
        conn: psycopg.Connection[Any] | None = None
        while not stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(db.libpq_url(config.database_url()), autocommit=True,
                                           application_name="dataloader-heartbeat", connect_timeout=5,
                                           options=f"-c statement_timeout={HEARTBEAT_TIMEOUT_MS}")
                beat(conn, self.name, loading.executing())
            except Exception as exc:  # noqa: BLE001 - the database is away; try again next beat
                _log("heartbeat_failed", error=_text(exc, 200))
                if conn is not None:
                    conn.close()
                conn = None
            stop.wait(HEARTBEAT_SECONDS)
        if conn is not None:
            try:
                forget(conn, self.name)
            except Exception as exc:  # noqa: BLE001 - the row goes stale and is cleaned up a day later
                _log("worker_not_forgotten", error=_text(exc, 200))
            finally:
                conn.close()

    def _reconcile_loop(self, stop: threading.Event) -> None:
        """One reconcile pass every RECONCILE_SECONDS (one worker at a time runs it, see loader.reconcile)."""
        while not stop.is_set():
            try:
                done = reconcile_once()
                if done and (done["batches"] or done["plans"]):
                    _log("reconciled", requeued=done)
            except Exception as exc:  # noqa: BLE001 - the database or Redis is away; try again next pass
                _log("reconcile_failed", error=_text(exc, 200))
            stop.wait(RECONCILE_SECONDS)


class RedactingFilter(logging.Filter):
    """Masks passwords (``db.redact``) in a log record's message, traceback and stack before any handler writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = db.redact(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = db.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = db.redact(record.stack_info)
        return True


def setup_worker_logging() -> None:
    """Every log line of the worker process, RQ's own included, on stderr with passwords masked.

    The root handler installed here is found by RQ, which then adds none of its own.
    """
    setup_process_logging()
    root = logging.getLogger()
    if not any(isinstance(f, RedactingFilter) for h in root.handlers for f in h.filters):
        stream = logging.StreamHandler()
        stream.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s", "%H:%M:%S"))
        root.addHandler(stream)
    for handler in root.handlers + logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def run_worker(*, burst: bool = False, concurrency: int = 1) -> int:
    """Process runs and batches until stopped (or, with ``burst``, until the queue is empty).

    With ``concurrency`` > 1, RQ's WorkerPool forks that many workers and respawns dead ones.
    Log lines never show a password (RedactingFilter).
    """
    setup_worker_logging()
    logging.getLogger("rq.worker").setLevel(logging.WARNING)
    _refuse_a_ledger_behind()
    redis = get_redis()
    if concurrency <= 1:
        return _work_until_stopped(redis, burst)
    pool = WorkerPool([config.get("ETL_QUEUE")], connection=redis, num_workers=concurrency,
                      worker_class=LedgerWorker)
    pool.start(burst=burst, logging_level="WARNING")
    return 0


def _refuse_a_ledger_behind() -> None:
    """Raise LedgerNotReady (the CLI prints it, exit 1) when the ledger is missing or behind this code.

    A worker newer than its ledger would write states the ledger's CHECK constraints refuse, or miss
    columns. An unreachable database is not a refusal: the worker starts and waits for it, as before.
    """
    try:
        ledger.check_ready()
    except TransientDbError as exc:
        _log("ledger_not_checked", error=str(exc), note="the database is unreachable; starting anyway")


def _log(event: str, **fields: object) -> None:
    logger.warning(db.redact(json.dumps({"event": event, **fields}, default=str)))


def _text(error: object, limit: int) -> str:
    """An error's text for a log line: redacted first, so that cutting it never leaves half a password."""
    return db.redact(str(error))[:limit]


def _work_until_stopped(redis: Redis, burst: bool) -> int:
    """Run LedgerWorkers one after another until SIGTERM / SIGINT (or, with ``burst``, an empty queue).

    RQ's work loop retries a lost Redis only while it waits for a job; a Redis error anywhere else
    (recording a job's end, the heartbeat after it) ends the loop, and its teardown raises. The ledger
    is the source of truth, so nothing is lost with the loop: after a backoff, once Redis answers, a
    new worker takes over (and the reconciler queues again what a restarted Redis forgot).
    """
    asked = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        asked.set()

    delay = RESTART_MIN_SECONDS
    while True:
        worker: LedgerWorker | None = None
        began = time.monotonic()
        error: BaseException | None = None
        try:
            worker = LedgerWorker([get_queue(redis)], connection=redis)  # already talks to Redis
            worker.work(burst=burst, with_scheduler=False, logging_level="WARNING")
        except RedisError as exc:  # Redis away at the start, or in the teardown (registering the death)
            error = exc
        except StopRequested:  # SIGTERM / SIGINT while the loop was ending
            return 0
        finally:
            # Until the next worker installs RQ's handlers, a stop request only ends the wait below.
            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
            if worker is not None and worker.pubsub_thread is not None:  # left running if the teardown failed
                worker.pubsub_thread.stop()
        if asked.is_set() or (worker is not None and worker.stop_asked):
            return 0
        if burst and error is None and _queue_empty(redis):
            return 0
        if time.monotonic() - began > RESTART_RESET_SECONDS:
            delay = RESTART_MIN_SECONDS
        if worker is None:
            _log("redis_unreachable", error=_text(error, 300), retry_in_s=delay)
        else:
            _log("worker_loop_ended", worker=worker.name, error=_text(error or "see the RQ error above", 300),
                 note=f"a new worker starts once Redis answers; next try in {delay:.0f} s")
        while not asked.wait(delay):
            delay = min(delay * 2, RESTART_MAX_SECONDS)
            try:
                redis.ping()
                break
            except RedisError as exc:
                _log("redis_unreachable", error=_text(exc, 300), retry_in_s=delay)
        if asked.is_set():
            return 0
        _log("worker_restarting", previous=worker.name if worker is not None else None)


def _queue_empty(redis: Redis) -> bool:
    with contextlib.suppress(RedisError):
        return get_queue(redis).count == 0
    return False
