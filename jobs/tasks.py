"""RQ task functions: importable, context-free, and thin: the loader does the work."""

from __future__ import annotations

from rq import get_current_job

from loader import loading, planning
from loader.loading import BatchOutcome
from loader.queue import enqueue_batches


def plan_run_task(job: str, run: str) -> int:
    """Plan a run and queue its batches; returns how many were queued."""
    current = get_current_job()
    indexes = planning.plan_run(job, run, worker=current.worker_name if current is not None else None)
    return enqueue_batches(job, run, indexes) if indexes else 0


def load_batch_task(job: str, run: str, batch: int, trigger: str = "auto") -> dict[str, object]:
    """Load one batch (exactly once, whatever RQ redelivers) and report what happened."""
    current = get_current_job()
    worker = current.worker_name if current is not None else None
    outcome: BatchOutcome = loading.load_batch(job, run, batch, worker=worker, trigger=trigger)
    return {"status": outcome.status, "attempts": outcome.attempts, "rows_inserted": outcome.rows_inserted,
            "rows_updated": outcome.rows_updated, "reason": outcome.reason}
