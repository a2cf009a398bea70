"""The monitored run's contract, cached in the session while the run's change signature stays put."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
import streamlit as st

import loader
from loader import LoaderError, run_metrics

from . import format as fmt
from .errors import user_message


def key(job: str, run: str, name: str) -> str:
    """The session-state key of one of a run's cached values (contract, series, detail, dialogs...)."""
    return f"mon:{job}:{run}:{name}"


def zone() -> str | None:
    """The browser's time zone, or None (no browser context: AppTest)."""
    try:
        return st.context.timezone
    except Exception:  # noqa: BLE001 - no browser context (AppTest)
        return None


def load(job: str, run: str) -> tuple[dict[str, Any] | None, str | None]:
    """The contract (cached while the run's change signature stays put), or the last one with the outage message.

    Most ticks change nothing: one index-only statement (``change_signature``, under 1 ms at 100k
    batches) tells. When it moved, the metrics come from the process's shared
    :mod:`loader.run_metrics` cache, which reads only the batches that changed (every session watching
    the run shares it), instead of the aggregate over every batch and attempt of the run (100-250 ms at
    100k batches); a run the cache does not hold yet is computed in full once while the cache reads it
    aside. The signature is read before the contract, so a change landing in between shows at the next
    tick rather than never.
    """
    cache_key = key(job, run, "contract")
    cached: dict[str, Any] | None = st.session_state.get(cache_key)
    try:
        signature = loader.change_signature(job, run)
        if cached is not None and cached["_signature"] == signature:
            return cached, None
        # The signature just read goes along: the metrics cache would otherwise read it again.
        contract = loader.run_contract(job, run, include_batches=False, metrics=run_metrics.shared(),
                                       signature=signature)
    except loader.RunNotFound:
        raise
    except (LoaderError, sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
        return cached, user_message(exc)
    contract["_signature"] = signature
    contract["_fetched"] = time.monotonic()
    st.session_state[cache_key] = contract
    return contract, None


def fresh(job: str, run: str) -> dict[str, Any] | None:
    """The contract as of now, for a panel on a timer of its own (chart, batch detail): it reads the change
    signature itself (one index-only statement) instead of waiting for the live fragment's next tick to
    move the cached contract, which made its lag the sum of two timers. None: the run is gone (the live
    fragment says so) or was never read (the database is away)."""
    try:
        return load(job, run)[0]
    except loader.RunNotFound:
        return None


def cached(job: str, run: str) -> dict[str, Any] | None:
    """The contract the live fragment read last (None before its first read)."""
    contract: dict[str, Any] | None = st.session_state.get(key(job, run, "contract"))
    return contract


def elapsed_ms(c: dict[str, Any]) -> float | None:
    """The run's wall time, moving on between two reads of the ledger while the run is active."""
    elapsed = c["metrics"].get("elapsed_ms")
    if elapsed is None or c["status"] in fmt.FINAL or "_fetched" not in c:
        return elapsed
    return float(elapsed) + (time.monotonic() - c["_fetched"]) * 1000
