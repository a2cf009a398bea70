"""The RQ half of reconciling: re-queue what the ledger says should be queued but Redis lost."""

from __future__ import annotations

from collections import defaultdict

from redis import Redis
from rq.job import Job

from loader import db, states
from loader.events import log_event
from loader.queue import batch_job_id, enqueue_batches, enqueue_plan, get_redis, group_size, plan_job_id
from loader.reconcile import Reconciled, exclusive, pending_batches, reconcile

#: RQ job states meaning "nobody will run this job again".
GONE = {None, b"finished", b"failed", b"stopped", b"canceled"}


def _missing(redis: Redis, ids: list[str], live_workers: set[str] | None = None) -> set[str]:
    """The job ids nobody will run: gone from Redis or ended, or (given ``live_workers``) started by a worker
    that stopped beating (a group job whose worker died leaves its later batches pending under it)."""
    pipe = redis.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(Job.key_for(job_id), "status", "worker_name")
    missing = set()
    for job_id, (status, worker) in zip(ids, pipe.execute(), strict=True):
        if status in GONE or (live_workers is not None and status == b"started"
                              and (worker or b"").decode() not in live_workers):
            missing.add(job_id)
    return missing


def requeue(found: Reconciled, redis: Redis | None = None) -> dict[str, int]:
    """Queue again the abandoned batches, and the pending batches and runs whose RQ job is gone.

    Call it with the reconcile lock held (:func:`loader.reconcile.exclusive`, as :func:`reconcile_once` does):
    it reads the pending batches itself, and two passes at once would both queue a lost one.
    """
    redis = redis or get_redis()
    todo: dict[tuple[str, str], set[int]] = defaultdict(set)
    for job, run, batch in found.abandoned:
        todo[(job, run)].add(batch)
    for page in pending_batches(found):  # a page at a time: the pass's memory does not grow with a run's size
        ids: dict[str, list[tuple[str, str, int]]] = defaultdict(list)
        for j, r, b, d, size in page.batches:
            ids[batch_job_id(j, r, b, d, group_size(size))].append((j, r, b))
        for job_id in _missing(redis, list(ids), page.live_workers):
            for j, r, b in ids[job_id]:
                todo[(j, r)].add(b)
    batches = 0
    for (job, run), indexes in todo.items():
        # Each is queued as a new delivery, under a job id of its own: an older delivery that is still
        # somewhere can only mark its own RQ job finished.
        with db.connection() as conn:
            deliveries = states.next_deliveries(conn, job, run, sorted(indexes))
        if not deliveries:
            continue
        indexes = set(deliveries)
        batches += enqueue_batches(job, run, sorted(indexes), deliveries=deliveries)
        log_event(None, job, run, "batches_requeued", level="warning", batches=sorted(indexes)[:50],
                  count=len(indexes))
    plans = 0
    lost = [(j, r) for j, r, planner_lost in found.plannable if planner_lost]
    waiting = {plan_job_id(j, r): (j, r) for j, r, planner_lost in found.plannable if not planner_lost}
    for job_id in _missing(redis, list(waiting)) if waiting else ():
        lost.append(waiting[job_id])
    for job, run in lost:
        enqueue_plan(job, run)
        log_event(None, job, run, "plan_requeued", level="warning")
        plans += 1
    return {"batches": batches, "plans": plans}


def reconcile_once() -> dict[str, int] | None:
    """One full pass (ledger, then queue); None when another worker is reconciling.

    The reconcile lock is held until the batches are queued again, so another worker's pass cannot
    find them still pending with their RQ job gone and queue them a second time.
    """
    with exclusive() as got:
        if not got:
            return None
        found = reconcile(locked=True)
        assert found is not None
        return requeue(found)
