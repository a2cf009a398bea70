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
GROUP_TASK = "jobs.tasks.load_batches_task"
#: A planned run's batches go to RQ in jobs of consecutive batches holding about this many records in all
#: (batch size 100: 10 batches a job; from 1000 up: one). An RQ job costs a few ms of bookkeeping (Redis
#: round trips, registries) whatever it carries; a small batch would pay it alone. Each batch is still its own
#: transaction with its own ledger row and attempt, and deliveries after the first (the reconciler's, a retry)
#: go one batch a job.
GROUP_RECORDS = 1000
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


def group_size(batch_size: int | None) -> int:
    """How many consecutive batches a run's first delivery puts in one RQ job at this batch size.

    Example::

        >>> group_size(100), group_size(250), group_size(1000)
        (10, 4, 1)
    """
    return max(1, GROUP_RECORDS // batch_size) if batch_size else 1


def batch_job_id(job: str, run: str, batch: int, delivery: int = 0, group: int = 1) -> str:
    """The RQ job id of one delivery of a batch (``batches.deliveries`` numbers them).

    Each delivery has its own id, so an execution that ends (or skips at the fence) marks only its own
    RQ job finished, never the one a later delivery is running under. A first delivery whose run's batches
    go ``group`` to a job (:func:`group_size`) is that group's job: ``-g`` and the group's first batch.
    """
    if delivery == 0 and group > 1:
        return f"dl-{_run_key(job, run)}-g{batch - batch % group}"
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
                    deliveries: Mapping[int, int] | None = None, group: int = 1) -> int:
    """Queue the batches, in pipelined chunks of RQ jobs (a run may have 10k+ batches); returns how many batches.

    ``deliveries`` gives each batch's delivery number (``states.next_deliveries``); the planner's first
    delivery is 0. ``group`` (:func:`group_size` of the run's batch size): first deliveries go that many
    consecutive batches to a job (``GROUP_TASK``), the others one a job (``BATCH_TASK``).
    """
    numbers = deliveries or {}
    jobs: list[tuple[str, list[int]]] = []  # (job id, batches), in the order of ``indexes``
    groups: dict[str, list[int]] = {}
    for index in indexes:
        delivery = numbers.get(index, 0)
        job_id = batch_job_id(job, run, index, delivery, group)
        if delivery == 0 and group > 1 and job_id in groups:
            groups[job_id].append(index)
            continue
        jobs.append((job_id, [index]))
        if delivery == 0 and group > 1:
            groups[job_id] = jobs[-1][1]
    queue = get_queue()
    try:
        for start in range(0, len(jobs), 500):
            queue.enqueue_many([
                Queue.prepare_data(
                    GROUP_TASK, (job, run, batches), {"trigger": trigger},
                    description=f"batches {batches[0]}-{batches[-1]} of {job}/{run}", result_ttl=RESULT_TTL,
                    failure_ttl=FAILURE_TTL, job_id=job_id)
                if job_id in groups else Queue.prepare_data(
                    BATCH_TASK, (job, run, batches[0]), {"trigger": trigger},
                    description=f"batch {batches[0]} of {job}/{run}", result_ttl=RESULT_TTL,
                    failure_ttl=FAILURE_TTL, job_id=job_id)
                for job_id, batches in jobs[start:start + 500]])
    except Exception as exc:
        raise ServiceError(f"cannot reach the queue (Redis): {exc}", run=run) from exc
    return sum(len(batches) for _, batches in jobs)


#: Job ids per pipelined round trip when a canceled run's jobs leave the queue.
REMOVE_CHUNK = 500


def remove_run_jobs(job: str, run: str, batches: Iterable[tuple[int, int]], *, queue: str | None = None,
                    plan: bool = False, group: int = 1) -> int:
    """Take a canceled run's jobs that no worker has started off the queue; returns how many left it.

    ``batches`` are (batch, delivery) of the batches to take off (the ones the cancel recorded as never to
    run) and ``plan`` adds the run's planning job; ``group`` is the run's :func:`group_size` (a waiting group
    job holds only unstarted batches). A job a worker already took is left alone: it finds
    the run canceled and ends at once. ``queue`` is the run's queue (default ETL_QUEUE). Raises ServiceError when Redis
    cannot be reached.

    Example::

        remove_run_jobs("orders", run_id, [(i, 0) for i in range(10_000)], queue="dataloader")
    """
    redis = get_redis()
    key = Queue(queue or config.get("ETL_QUEUE"), connection=redis).key
    ids = ([plan_job_id(job, run)] if plan else []) + list(dict.fromkeys(
        batch_job_id(job, run, i, d, group) for i, d in batches))
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
