"""A progress bar for a run (tqdm: a bar in a terminal, a widget in Jupyter), fed with its contracts."""

from __future__ import annotations

import os
import sys
from typing import Any

#: The bar's size on a terminal that reports none (a fresh pseudo-terminal says 0 x 0).
FALLBACK_COLUMNS = 100
FALLBACK_ROWS = 24


def _width(file: Any) -> dict[str, Any]:
    """Follow the terminal's width when it reports one, else a fixed width."""
    try:
        columns = os.get_terminal_size((file or sys.stderr).fileno()).columns
    except (OSError, ValueError, AttributeError):
        columns = 0
    # Both: tqdm takes a reported 0 rows as "no room" and draws nothing.
    return {"dynamic_ncols": True} if columns else {"ncols": FALLBACK_COLUMNS, "nrows": FALLBACK_ROWS}


class RunProgress:
    """Batches ended out of the run's total, with its status, failures and rows per second.

    ``update`` takes a run contract (or a "run" event's data); ``close`` leaves the bar as it ended.
    tqdm's ``auto`` picks a notebook widget inside Jupyter (with ipywidgets installed; a text bar
    otherwise) and a text bar elsewhere; ``file`` is where a text bar goes (stderr by default).
    """

    def __init__(self, job: str, run: str, *, file: Any = None) -> None:
        from tqdm.auto import tqdm

        short = run if len(run) <= 12 else run[:8] + "…"  # a UUID would leave the figures no room
        self._bar = tqdm(total=0, desc=f"{job}/{short}", unit="batch", file=file, leave=True, **_width(file))

    def update(self, contract: dict[str, Any]) -> None:
        m = contract["metrics"]
        ended = m["batches_succeeded"] + m["batches_failed"] + m.get("batches_canceled", 0)
        if self._bar.total != m["batches_total"]:
            self._bar.total = m["batches_total"]
        self._bar.n = ended
        self._bar.set_postfix_str(f"{contract['status']}, {m['batches_failed']} failed, "
                                  f"{m['throughput_rps']:,.0f} rows/s", refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()
