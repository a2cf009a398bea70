"""The audit trail: who started, retried, canceled or force-started a run, recorded with the action itself.

Every action on a run writes one row of the ``actions`` ledger table inside the transaction that does
it (``runs.create_run``, ``runs.reset_failed_batches``, ``runs.cancel``), so the ledger never holds an
action without its actor, nor an actor for an action that rolled back. The time is the database's
clock, like every other time of the ledger. Actors are text from outside (an e-mail from a proxy
header, an OS user name, ``ETL_ACTOR``): stored as given, shown escaped.
"""

from __future__ import annotations

import getpass
import os
from enum import StrEnum
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg.types.json import Jsonb

from . import config
from .db import ledger_table
from .errors import ConfigError
from .ledger import actions

#: Longest actor name kept (an e-mail address is at most 320 characters, RFC 3696 errata).
MAX_ACTOR = 320
#: The actor of the console's actions when it identifies nobody (``ETL_AUTH=none``).
ANONYMOUS = "anonymous"


class Action(StrEnum):
    """What was asked of a run: the ``action`` column of the ledger."""

    START = "start"
    FORCED_START = "forced_start"  # a start while another run of the job was in progress was allowed
    RETRY = "retry"
    CANCEL = "cancel"


def check_actor(value: str) -> str:
    """An actor name, stripped: not empty, at most :data:`MAX_ACTOR` characters, no control character.

    Example::

        >>> check_actor("  ana@example.com ")
        'ana@example.com'
    """
    text = value.strip()
    if not text or len(text) > MAX_ACTOR or any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise ConfigError(f"actor {value[:80]!r} must be 1 to {MAX_ACTOR} printable characters", actor=value[:80])
    return text


def default_actor() -> str:
    """Who acts from the CLI or a notebook: ``ETL_ACTOR`` when set, else the OS user name.

    Example::

        >>> os.environ["ETL_ACTOR"] = "nightly-cron"; default_actor()
        'nightly-cron'
    """
    named = config.get("ETL_ACTOR")
    if named:
        return check_actor(named)
    try:
        return check_actor(getpass.getuser())
    except (OSError, KeyError):  # no user name in the environment nor the password database (a bare container)
        return check_actor(f"uid:{os.getuid()}")


def actor_or_default(actor: str | None) -> str:
    """The actor given, checked, or :func:`default_actor` when None."""
    return default_actor() if actor is None else check_actor(actor)


_RECORD = "INSERT INTO {} (etl_job_id, etl_run_id, actor, action, detail) VALUES (%s, %s, %s, %s, %s)"


def record(conn: psycopg.Connection[Any], job: str, run: str, actor: str, action: Action,
           **detail: Any) -> None:
    """One row of the audit trail, in the caller's transaction (the one that does the action)."""
    from psycopg import sql

    conn.execute(sql.SQL(_RECORD).format(ledger_table("actions")),
                 [job, run, actor, action.value, Jsonb(detail)])


def run_actions(conn: sa.Connection, job: str, run: str) -> list[dict[str, Any]]:
    """The run's actions, oldest first, as the contract gives them: ``{at, actor, action, detail}``."""
    from .contract import iso

    a = actions.c
    rows = conn.execute(sa.select(a.at, a.actor, a.action, a.detail)
                        .where(a.etl_job_id == job, a.etl_run_id == run).order_by(a.id))
    return [{"at": iso(r.at), "actor": r.actor, "action": r.action, "detail": r.detail} for r in rows]
