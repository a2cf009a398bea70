"""Following a run as a stream of events: what changed since the last look, for code and for the console.

One :class:`RunFollower` per followed run reads :func:`contract.change_signature` (about 1 ms) each time
it is asked; only when that moved does it read the run's summary (the contract without its batches)
and the batches whose change number moved. Every event carries a change number as its ``id``: give
the last one seen back as ``after`` (the console's event stream takes it from ``Last-Event-ID``) to
resume without losing a change.

Change numbers are taken just before their transaction commits, so a batch can commit after another
with a higher number (see ``change_signature``). A follower therefore re-reads from
:data:`contract.SIGNATURE_WINDOW` numbers below the newest it has seen and sends a batch again only
when its number differs from the one it sent; a resumed follower re-sends that window (a batch event
carries the batch's whole state, so a repeat changes nothing for the reader).

Example::

    for event in follow_run("orders", run_id):
        print(event.event, event.data["status"])  # "run" events; "batch" events carry one batch
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from . import db
from .contract import SIGNATURE_WINDOW, batch_dict, batch_rows_query, change_signature, run_contract
from .ledger import batches
from .states import FINAL_RUN_STATES

FINAL = frozenset(s.value for s in FINAL_RUN_STATES)
#: Seconds between two looks at a followed run.
FOLLOW_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class RunEvent:
    """One change: ``event`` is "run" (``data``: the run contract without its batches: status, metrics,
    validation summary, error) or "batch" (``data``: one batch as in the contract, without its logs).
    ``id``: the change number it brings the reader up to."""

    event: str
    id: int
    data: dict[str, Any]

    @property
    def final(self) -> bool:
        """A "run" event of a run that will not change again (until someone retries it)."""
        return self.event == "run" and self.data["status"] in FINAL


def _batch_event(row: sa.Row[Any]) -> RunEvent:
    data = batch_dict(row, None)
    del data["logs_fragment"]
    return RunEvent("batch", int(row.change_seq), data)


class RunFollower:
    """What changed in one run since the last :meth:`poll` (raises RunNotFound for an unknown run).

    ``after``: the id of the last event the reader has; its first poll then sends the batches changed
    since (and the window below it), before the run event. Without it, the first poll sends the run
    event alone: the reader starts from the run's present state.
    """

    def __init__(self, job: str, run: str, *, after: int | None = None) -> None:
        self.job, self.run = job, run
        self._signature: tuple[int, int, int, int] | None = None
        self._after = after
        self._sent: dict[int, int] = {}  # batch index -> change number sent, for the batches in the window
        self._top = 0  # the newest batch change number read so far

    def poll(self) -> list[RunEvent]:
        """The events since the last poll (empty when nothing changed): batches first, then the run."""
        with db.get_engine().connect() as conn:
            signature = change_signature(self.job, self.run, conn)
            if signature == self._signature:
                return []
        from . import run_metrics  # here: numpy is imported only by the processes that follow runs

        # The run before its batches: a run that ended through its last batch has every batch ended before
        # it, so the batches read next include the last one (read after them, a batch committing in between
        # was left out of the stream that ends with the final run event). A run canceled while a batch is
        # loading can still end its stream with that batch running (it is recorded canceled just after).
        summary = run_contract(self.job, self.run, include_batches=False, metrics=run_metrics.shared())
        del summary["batches"]
        with db.get_engine().connect() as conn:
            first = self._signature is None
            self._signature = signature
            events: list[RunEvent] = []
            # A new reader starts from the present: the window's batches are taken as sent.
            baseline = first and self._after is None
            since = signature[1] if baseline else (self._after or 0) if first else self._top
            rows = conn.execute(
                batch_rows_query(self.job, self.run).add_columns(batches.c.change_seq)
                .where(batches.c.change_seq > since - SIGNATURE_WINDOW).order_by(batches.c.change_seq))
            for row in rows:
                if self._sent.get(row.batch_index) != row.change_seq:
                    if not baseline:
                        events.append(_batch_event(row))
                    self._sent[row.batch_index] = int(row.change_seq)
            self._top = max(self._top, signature[1])
            self._forget_below(self._top - SIGNATURE_WINDOW)
        events.append(RunEvent("run", max(signature[0], self._top), summary))
        return events

    def _forget_below(self, floor: int) -> None:
        if len(self._sent) > 4 * SIGNATURE_WINDOW:  # keep memory flat on a run of 100k batches
            self._sent = {i: seq for i, seq in self._sent.items() if seq > floor}


def follow_run(job: str, run: str, *, after: int | None = None, interval: float = FOLLOW_SECONDS,
               timeout: float | None = None) -> Iterator[RunEvent]:
    """The run's events as they happen, ending after the "run" event of its final status.

    The first event is the run as it is now (or, with ``after``, the batches changed since that event
    id); each later one comes within ``interval`` seconds of the change. Raises RunNotFound for an
    unknown run, TimeoutError after ``timeout`` seconds. The same events as the console's
    ``/etl/data-loader/api/runs/<job>/<run>/events`` stream.

    Example::

        for event in follow_run("orders", ref.etl_run_id):
            if event.event == "batch" and event.data["status"] == "failed":
                print("batch", event.data["index"], event.data["error_message"])
    """
    follower = RunFollower(job, run, after=after)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        for event in follower.poll():
            yield event
            if event.final:
                return
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"run {job}/{run} not final after {timeout} s")
        time.sleep(interval)
