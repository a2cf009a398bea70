"""Putting runs and batches on the RQ queue, and taking a canceled run's jobs off it.

The engine names the task functions by their dotted path (``jobs.tasks.load_batch_task``): RQ imports
them in the worker, so the engine never imports ``jobs/``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from redis import Redis, RedisError
from rq import Queue
from rq.job import Job

from . import config
from .errors import ServiceError

#: The RQ task functions, by dotted path (imported by the worker, never by the engine).
PLAN_TASK = "jobs.tasks.plan_run_task"
BATCH_TASK = "jobs.tasks.load_batch_task"
#: Keep a finished job's RQ record briefly; the ledger is the record that matters.
RESULT_TTL = 600
FAILURE_TTL = 24 * 3600
#: Seconds a Redis command may take before the client gives up (the worker's own blocking dequeue gets
#: RQ's longer timeout). Without it, a Redis that stops answering mid-command hangs its caller for ever.
REDIS_SOCKET_TIMEOUT = 10.0


def _run_key(job: str, run: str) -> str:
    return hashlib.sha1(f"{job}\x00{run}".encode()).hexdigest()[:20]


def plan_job_id(job: str, run: str) -> str:
    """The RQ job id of a run's planning: fixed, so the reconciler can tell whether it still exists."""
    return f"dl-{_run_key(job, run)}-plan"


def batch_job_id(job: str, run: str, batch: int, delivery: int = 0) -> str:
    """The RQ job id of one delivery of a batch (``batches.deliveries`` numbers them).

    Each delivery has its own id, so an execution that ends (or skips at the fence) marks only its own
    RQ job finished, never the one a later delivery is running under.
    """
    base = f"dl-{_run_key(job, run)}-b{batch}"
    return base if delivery == 0 else f"{base}-d{delivery}"


def get_redis(url: str | None = None) -> Redis:
    return Redis.from_url(url or config.redis_url(), health_check_interval=30, socket_connect_timeout=5,
                          socket_timeout=REDIS_SOCKET_TIMEOUT)


def get_queue(connection: Redis | None = None) -> Queue:
    return Queue(config.get("ETL_QUEUE"), connection=connection or get_redis(),
                 default_timeout=config.get_int("ETL_JOB_TIMEOUT", minimum=10))


def enqueue_plan(job: str, run: str) -> str:
    """Queue the planning of a run; returns the RQ job id."""
    try:
        rq_job = get_queue().enqueue(
            PLAN_TASK, job, run, description=f"plan run {job}/{run}",
            job_id=plan_job_id(job, run),
            result_ttl=RESULT_TTL, failure_ttl=FAILURE_TTL)
    except Exception as exc:  # redis.exceptions.* (connection refused, timeout): say it plainly
        raise ServiceError(f"cannot reach the queue (Redis): {exc}", run=run) from exc
    return str(rq_job.id)


def enqueue_batches(job: str, run: str, indexes: Iterable[int], trigger: str = "auto",
                    deliveries: Mapping[int, int] | None = None) -> int:
    """Queue one RQ job per batch, in pipelined chunks (a run may have 10k+ batches).

    ``deliveries`` gives each batch's delivery number (``states.next_deliveries``); the planner's first
    delivery is 0.
    """
    numbers = deliveries or {}
    queue = get_queue()
    count = 0
    chunk: list[object] = []
    try:
        for index in indexes:
            chunk.append(Queue.prepare_data(
                BATCH_TASK, (job, run, index), {"trigger": trigger},
                description=f"batch {index} of {job}/{run}", result_ttl=RESULT_TTL, failure_ttl=FAILURE_TTL,
                job_id=batch_job_id(job, run, index, numbers.get(index, 0))))
            if len(chunk) == 500:
                queue.enqueue_many(chunk)  # type: ignore[arg-type]
                count += len(chunk)
                chunk = []
        if chunk:
            queue.enqueue_many(chunk)  # type: ignore[arg-type]
            count += len(chunk)
    except Exception as exc:
        raise ServiceError(f"cannot reach the queue (Redis): {exc}", run=run) from exc
    return count


#: Job ids per pipelined round trip when a canceled run's jobs leave the queue.
REMOVE_CHUNK = 500


def remove_run_jobs(job: str, run: str, batches: Iterable[tuple[int, int]], *, queue: str | None = None,
                    plan: bool = False) -> int:
    """Take a canceled run's jobs that no worker has started off the queue; returns how many left it.

    ``batches`` are (batch, delivery) of the batches to take off (the ones the cancel recorded as never to
    run) and ``plan`` adds the run's planning job. A job a worker already took is left alone: it finds
    the run canceled and ends at once. ``queue`` is the run's queue (default ETL_QUEUE). Raises ServiceError when Redis
    cannot be reached.

    Example::

        remove_run_jobs("orders", run_id, [(i, 0) for i in range(10_000)], queue="dataloader")
    """
    redis = get_redis()
    key = Queue(queue or config.get("ETL_QUEUE"), connection=redis).key
    ids = ([plan_job_id(job, run)] if plan else []) + [batch_job_id(job, run, i, d) for i, d in batches]
    removed = 0
    try:
        for start in range(0, len(ids), REMOVE_CHUNK):
            chunk = ids[start:start + REMOVE_CHUNK]
            pipe = redis.pipeline(transaction=False)
            for job_id in chunk:  # queued in index order, so each is found near the head of the list
                pipe.lrem(key, 1, job_id)
            gone = [job_id for job_id, n in zip(chunk, pipe.execute(), strict=True) if n]
            if gone:
                pipe = redis.pipeline(transaction=False)
                for job_id in gone:
                    pipe.delete(Job.key_for(job_id))
                pipe.execute()
            removed += len(gone)
    except RedisError as exc:
        raise ServiceError(f"cannot reach the queue (Redis): {exc}", run=run) from exc
    return removed
