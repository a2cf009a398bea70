"""The worker entry: RQ workers that run batches in-process, so pooled connections are reused."""

from __future__ import annotations

import logging

from rq import SimpleWorker
from rq.worker_pool import WorkerPool

from loader import config
from loader.events import setup_process_logging

from .queues import get_queue, get_redis


def run_worker(*, burst: bool = False, concurrency: int = 1) -> int:
    """Process runs and batches until stopped (or, with ``burst``, until the queue is empty).

    ``SimpleWorker`` runs each job in the worker process itself instead of forking a child per job:
    the PostgreSQL pool and the compiled JSON Schema survive from one batch to the next. With
    ``concurrency`` > 1, RQ's WorkerPool forks that many such workers and respawns dead ones.
    """
    setup_process_logging()
    logging.getLogger("rq.worker").setLevel(logging.WARNING)
    redis = get_redis()
    queue_name = config.get("ETL_QUEUE")
    if concurrency <= 1:
        worker = SimpleWorker([get_queue(redis)], connection=redis)
        worker.work(burst=burst, with_scheduler=False, logging_level="WARNING")
        return 0
    pool = WorkerPool([queue_name], connection=redis, num_workers=concurrency, worker_class=SimpleWorker)
    pool.start(burst=burst, logging_level="WARNING")
    return 0
