"""RQ task functions: importable, context-free, and thin: the loader does the work."""

from __future__ import annotations

from rq import get_current_job

from loader import loading, planning, runs
from loader.loading import BatchOutcome
from loader.queue import enqueue_batches, group_size, remove_run_jobs


def plan_run_task(job: str, run: str) -> int:
    """Plan a run and queue its batches; returns how many were queued.

    A cancel that commits between the planning's commit and this enqueue finds no job to take off the
    queue: so the planner looks at the run once its jobs are queued and takes them off itself (each
    would end at once anyway, loading nothing).
    """
    current = get_current_job()
    indexes = planning.plan_run(job, run, worker=current.worker_name if current is not None else None)
    if not indexes:
        return 0
    group = group_size(runs.batch_size(job, run))
    queued = enqueue_batches(job, run, indexes, group=group)
    if runs.is_canceled(job, run):
        remove_run_jobs(job, run, [(i, 0) for i in indexes], group=group)
        return 0
    return queued


def load_batch_task(job: str, run: str, batch: int, trigger: str = "auto") -> dict[str, object]:
    """Load one batch (exactly once, whatever RQ redelivers) and report what happened."""
    current = get_current_job()
    worker = current.worker_name if current is not None else None
    return _report(loading.load_batch(job, run, batch, worker=worker, trigger=trigger))


def load_batches_task(job: str, run: str, batches: list[int], trigger: str = "auto") -> list[dict[str, object]]:
    """Load consecutive batches of a run one after another, each exactly as ``load_batch_task`` loads one (its
    own transaction, ledger row and attempts), and report what happened to each.

    One RQ job for several small batches (``queue.group_size``). If one raises (its RQ job timed out, or the
    ledger could not record its outcome), the job fails and the batches after it stay pending with their job
    gone: the reconciler queues them again one by one, as it does for any lost job.
    """
    current = get_current_job()
    worker = current.worker_name if current is not None else None
    return [_report(loading.load_batch(job, run, batch, worker=worker, trigger=trigger)) for batch in batches]


def _report(outcome: BatchOutcome) -> dict[str, object]:
    return {"status": outcome.status, "attempts": outcome.attempts, "rows_inserted": outcome.rows_inserted,
            "rows_updated": outcome.rows_updated, "reason": outcome.reason}
