"""The worker entry: RQ workers that run batches in-process, beat in the ledger and reconcile."""

from __future__ import annotations

import logging
import threading
from typing import Any

import psycopg
from rq import SimpleWorker
from rq.worker_pool import WorkerPool

from loader import config, db
from loader.events import setup_process_logging
from loader.reconcile import beat, forget

from .queues import get_queue, get_redis
from .reconciler import reconcile_once

logger = logging.getLogger("dataloader")

#: Seconds between two heartbeats of a worker in the ledger.
HEARTBEAT_SECONDS = 3.0
#: Seconds between two reconcile passes (each worker tries; one at a time runs).
RECONCILE_SECONDS = 5.0


class LedgerWorker(SimpleWorker):
    """An RQ SimpleWorker that also beats in the ledger and reconciles, from a side thread.

    ``SimpleWorker`` runs each job in the worker process itself instead of forking a child per job,
    so the PostgreSQL pool and the compiled JSON Schema survive from one batch to the next.
    The heartbeat lives in PostgreSQL (not only in Redis): a worker killed mid-batch is noticed
    within seconds, and a Redis flush does not make live workers look dead.
    """

    def work(self, *args: Any, **kwargs: Any) -> bool:
        stop = threading.Event()
        thread = threading.Thread(target=self._side_loop, args=(stop,), name="dataloader-heartbeat", daemon=True)
        thread.start()
        try:
            return bool(super().work(*args, **kwargs))
        finally:
            stop.set()
            thread.join(timeout=5)

    def _side_loop(self, stop: threading.Event) -> None:
        conn: psycopg.Connection[Any] | None = None
        last_reconcile = 0.0
        import time

        while not stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(db.libpq_url(config.database_url()), autocommit=True,
                                           application_name="dataloader-heartbeat", connect_timeout=5)
                beat(conn, self.name)
                if time.monotonic() - last_reconcile >= RECONCILE_SECONDS:
                    last_reconcile = time.monotonic()
                    done = reconcile_once()
                    if done and (done["batches"] or done["plans"]):
                        logger.warning('{"event": "reconciled", "requeued": %s}', done)
            except Exception as exc:  # noqa: BLE001 - the database or Redis is away; try again next beat
                logger.warning('{"event": "heartbeat_failed", "error": "%s"}', db.redact(str(exc))[:200])
                if conn is not None:
                    conn.close()
                conn = None
            stop.wait(HEARTBEAT_SECONDS)
        if conn is not None:
            try:
                forget(conn, self.name)
            finally:
                conn.close()


def run_worker(*, burst: bool = False, concurrency: int = 1) -> int:
    """Process runs and batches until stopped (or, with ``burst``, until the queue is empty).

    With ``concurrency`` > 1, RQ's WorkerPool forks that many workers and respawns dead ones.
    """
    setup_process_logging()
    logging.getLogger("rq.worker").setLevel(logging.WARNING)
    redis = get_redis()
    if concurrency <= 1:
        worker = LedgerWorker([get_queue(redis)], connection=redis)
        worker.work(burst=burst, with_scheduler=False, logging_level="WARNING")
        return 0
    pool = WorkerPool([config.get("ETL_QUEUE")], connection=redis, num_workers=concurrency,
                      worker_class=LedgerWorker)
    pool.start(burst=burst, logging_level="WARNING")
    return 0
