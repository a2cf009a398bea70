"""Recent runs with their headline counts, without summing the batches of every listed run at every refresh.

The counts (rows inserted and updated, validation failures, failed batches) of a run that ended
(``success``, ``partial_success``, ``failed``) cannot change until the run is retried, which moves the run
row's change number: they are summed once per process and kept, keyed by that number. A canceled run's are
kept by its newest batch change number too (a batch running at the cancel may still fail, and moves it). A
run in progress is read through a :class:`~loader.run_metrics.MetricsCache` when the caller has one (the
console: only its changed batches), else summed. A refresh of a page of ended runs is one statement: the
page of runs, newest first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Collection
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from . import db
from .contract import iso
from .ledger import batches, runs
from .states import BatchStatus, RunStatus

if TYPE_CHECKING:  # numpy only where metrics are kept (the console)
    from .run_metrics import MetricsCache

#: Run states whose batches cannot change until the run is retried (and its change number moves).
SETTLED = frozenset({RunStatus.SUCCESS.value, RunStatus.PARTIAL_SUCCESS.value, RunStatus.FAILED.value})
#: Ended runs whose counts are kept (canceled ones by their newest batch change number as well).
KEPT = SETTLED | {RunStatus.CANCELED.value}
#: Ended runs whose counts one process keeps (a few hundred bytes each).
MEMO_RUNS = 20_000
COUNTED = ("rows_inserted", "rows_updated", "validation_failures", "batches_failed")

_memo: OrderedDict[tuple[str, str, str], tuple[tuple[int, int, int | None], dict[str, int]]] = OrderedDict()
_memo_lock = threading.Lock()


def _sums(keys: list[tuple[str, str]]) -> sa.Select[Any]:
    """The counts of the runs named, summed over their batches (one statement for all of them)."""
    b = batches.c
    return (sa.select(b.etl_job_id, b.etl_run_id,
                      sa.func.sum(b.rows_inserted).label("rows_inserted"),
                      sa.func.sum(b.rows_updated).label("rows_updated"),
                      sa.func.sum(b.validation_failures).label("validation_failures"),
                      sa.func.count().filter(b.status == BatchStatus.FAILED.value).label("batches_failed"))
            .where(sa.tuple_(b.etl_job_id, b.etl_run_id).in_(keys))
            .group_by(b.etl_job_id, b.etl_run_id))


def list_runs(job: str | None = None, limit: int = 50, *, hidden_jobs: Collection[str] = (),
              metrics: MetricsCache | None = None) -> list[dict[str, Any]]:
    """Recent runs, newest first, with their headline counts.

    ``hidden_jobs``: jobs whose runs are left out before the ``limit`` is applied (the console's jobs a
    person may not view), so that they take no place in the list. ``metrics``: the cache through which runs
    in progress are read (the console passes ``run_metrics.shared()``, which its monitors share).

    Example::

        for r in list_runs("orders", limit=20):
            print(r["etl_run_id"], r["status"], r["rows_inserted"])
    """
    r, b = runs.c, batches.c
    newest = (sa.select(sa.func.max(b.change_seq)).where(b.etl_job_id == r.etl_job_id, b.etl_run_id == r.etl_run_id)
              .scalar_subquery())  # one backward probe of batches_change_idx, for canceled runs only
    q = (sa.select(r.etl_job_id, r.etl_run_id, r.run_seq, r.status, r.batch_size, r.started_at, r.completed_at,
                   r.started_by, r.batches_total, r.change_seq,
                   sa.case((r.status == RunStatus.CANCELED.value, newest)).label("batch_top"))
         .order_by(r.started_at.desc()).limit(limit))
    if job is not None:
        q = q.where(r.etl_job_id == job)
    if hidden_jobs:
        q = q.where(r.etl_job_id.not_in(list(hidden_jobs)))
    schema = db.ledger_schema()
    counts: dict[tuple[str, str], dict[str, int]] = {}
    with db.get_engine().connect() as conn:
        page = conn.execute(q).all()
        to_sum: list[tuple[str, str]] = []
        for x in page:
            key = (x.etl_job_id, x.etl_run_id)
            if x.status in KEPT:
                with _memo_lock:
                    kept = _memo.get((schema, *key))
                if kept is not None and kept[0] == (x.run_seq, x.change_seq, x.batch_top):
                    counts[key] = kept[1]
                    continue
            f = None
            if metrics is not None and x.status not in KEPT and x.batches_total:
                f = metrics.figures(conn, x, datetime.now(UTC))
            if f is not None:
                counts[key] = {c: int(getattr(f, c)) for c in COUNTED}
            else:
                to_sum.append(key)
        if to_sum:
            for s in conn.execute(_sums(to_sum)):
                counts[(s.etl_job_id, s.etl_run_id)] = {c: int(getattr(s, c) or 0) for c in COUNTED}
    with _memo_lock:
        for x in page:
            key = (x.etl_job_id, x.etl_run_id)
            if x.status in KEPT and key in counts:
                _memo[(schema, *key)] = ((x.run_seq, x.change_seq, x.batch_top), counts[key])
                _memo.move_to_end((schema, *key))
        while len(_memo) > MEMO_RUNS:
            _memo.popitem(last=False)
    out = []
    for x in page:
        c = counts.get((x.etl_job_id, x.etl_run_id), dict.fromkeys(COUNTED, 0))
        out.append({"etl_job_id": x.etl_job_id, "etl_run_id": x.etl_run_id, "status": x.status,
                    "batch_size": x.batch_size, "started_at": iso(x.started_at), "completed_at": iso(x.completed_at),
                    "started_by": x.started_by, "batches_total": x.batches_total, **c})
    return out
