"""Putting runs and batches on the RQ queue, and asking whether any worker is listening."""

from __future__ import annotations

from collections.abc import Iterable

from redis import Redis
from rq import Queue, Worker

from loader import config
from loader.errors import ServiceError

#: Keep a finished job's RQ record briefly; the ledger is the record that matters.
RESULT_TTL = 600
FAILURE_TTL = 24 * 3600


def get_redis(url: str | None = None) -> Redis:
    return Redis.from_url(url or config.redis_url(), health_check_interval=30, socket_connect_timeout=5)


def get_queue(connection: Redis | None = None) -> Queue:
    return Queue(config.get("ETL_QUEUE"), connection=connection or get_redis(),
                 default_timeout=config.get_int("ETL_JOB_TIMEOUT", minimum=10))


def enqueue_plan(job: str, run: str) -> str:
    """Queue the planning of a run; returns the RQ job id."""
    try:
        rq_job = get_queue().enqueue(
            "jobs.tasks.plan_run_task", job, run, description=f"plan run {job}/{run}",
            result_ttl=RESULT_TTL, failure_ttl=FAILURE_TTL)
    except Exception as exc:  # redis.exceptions.* (connection refused, timeout): say it plainly
        raise ServiceError(f"cannot reach the queue (Redis): {exc}", run=run) from exc
    return str(rq_job.id)


def enqueue_batches(job: str, run: str, indexes: Iterable[int], trigger: str = "auto") -> int:
    """Queue one RQ job per batch, in pipelined chunks (a run may have 10k+ batches)."""
    queue = get_queue()
    count = 0
    chunk: list[object] = []
    try:
        for index in indexes:
            chunk.append(Queue.prepare_data(
                "jobs.tasks.load_batch_task", (job, run, index), {"trigger": trigger},
                description=f"batch {index} of {job}/{run}", result_ttl=RESULT_TTL, failure_ttl=FAILURE_TTL))
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


def workers_alive() -> int:
    """How many RQ workers listen on the loader's queue (0: nobody will process the run)."""
    queue = get_queue()
    return len(Worker.all(queue=queue))
