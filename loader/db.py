"""Connections: one psycopg pool per process, which SQLAlchemy Core borrows from too, and database error triage."""

from __future__ import annotations

import functools
import json
import os
import re
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from typing import Any
from urllib.parse import quote, quote_plus, urlsplit

import psycopg
import sqlalchemy as sa
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg_pool import ConnectionPool, PoolTimeout
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

from . import config
from .errors import LoaderError, PermanentDbError, TransientDbError

#: SQLSTATEs worth another attempt: the server or the connection went away, or two writers collided.
TRANSIENT_SQLSTATES = frozenset({
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "55P03",  # lock_not_available (lock_timeout)
    "57014",  # query_canceled (statement_timeout, pg_cancel_backend)
    "57P01",  # admin_shutdown (pg_terminate_backend, fast shutdown)
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now (starting up / shutting down)
    "53300",  # too_many_connections
    "53400",  # configuration_limit_exceeded
    "25P03",  # idle_in_transaction_session_timeout (the session was ended)
})
TRANSIENT_CLASSES = ("08",)  # connection exceptions

_lock = threading.Lock()
_pools: dict[tuple[int, str], ConnectionPool] = {}
_engines: dict[tuple[int, str, str], sa.engine.Engine] = {}
#: Milliseconds a read of this process may run before PostgreSQL cancels it (0: no limit); see
#: :func:`set_read_timeout`.
_read_timeout_ms = 0
#: The read limit (ms) a pooled session was last SET to; absent: the limits of its startup packet
#: (:func:`session_timeouts`, the writes'). A psycopg connection is one session for its whole life.
_session_limit: weakref.WeakKeyDictionary[psycopg.Connection[Any], int] = weakref.WeakKeyDictionary()
#: For a borrower that asks (``connection(skip_fresh_check=True)``: the batch path), a pooled connection
#: given back less than this many seconds ago is lent without the pool's check (an empty query: one round
#: trip a borrow, a tenth of a small batch's). A session ended since is met by the borrower's first
#: statement instead: a batch's claim failing so has started no attempt, and waits for the database as for
#: a refused connection. Every other borrower gets a checked connection, as an API caller expects.
FRESH_CONNECTION_SECONDS = 1.0
#: When each pooled connection was last given back through :func:`connection` (time.monotonic()).
_returned_at: weakref.WeakKeyDictionary[psycopg.Connection[Any], float] = weakref.WeakKeyDictionary()
#: Set for the duration of a borrow that accepts a fresh connection unchecked (the pool checks in the
#: borrowing thread).
_borrowing = threading.local()


def libpq_url(url: str) -> str:
    """Accept postgres://, postgresql:// and SQLAlchemy's postgresql+psycopg:// forms."""
    return re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql://", url)


#: Environment variables that hold a store's credentials: their values never appear in an error or a log.
SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AZURE_STORAGE_KEY",
                   "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_CONNECTION_STRING",
                   "AZURE_CLIENT_SECRET")
#: Values expanded from "${VAR}" in a job's storage_options in this process (loader.storage adds them).
_secrets: set[str] = set()
#: Query parameters of signed URLs whose values are credentials.
_SIGNED_QUERY_RE = re.compile(r"((?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|X-Goog-Signature|"
                              r"X-Goog-Credential|sig|signature|token|access_token)=)[^&\s]+", re.IGNORECASE)


def add_secret(value: str) -> None:
    """Have :func:`redact` hide ``value`` from now on in this process (a credential read from the environment);
    values under 4 characters are not secrets worth the false matches."""
    if len(value) >= 4:
        _secrets.add(value)


@functools.lru_cache(maxsize=256)
def _written_forms(value: str) -> tuple[str, ...]:
    """``value`` and the other ways a message may spell it: JSON-escaped, URL-encoded (``%2F``, ``+``)."""
    forms = {value, json.dumps(value)[1:-1], quote(value, safe=""), quote_plus(value, safe="")}
    return tuple(sorted(forms, key=len, reverse=True))


def redact(text: str) -> str:
    """Replace the passwords of DATABASE_URL and REDIS_URL (and of any URL in ``text``), the stores' credential
    variables, the values of a job's ``"${VAR}"`` storage options and signed-URL signatures with ***."""
    for name in ("DATABASE_URL", "REDIS_URL"):
        url = os.environ.get(name, "")
        password = urlsplit(url).password if "://" in url else None
        if password:
            text = text.replace(password, "***")
    for value in (*(os.environ.get(n, "") for n in SECRET_ENV_VARS), *_secrets):
        if len(value) >= 4:
            for form in _written_forms(value):  # as it is, and as JSON or a URL would carry it
                text = text.replace(form, "***")
    text = _SIGNED_QUERY_RE.sub(r"\1***", text)
    return re.sub(r"(\w+://[^:/@\s]*:)[^@\s]+@", r"\1***@", text)


def ledger_schema() -> str:
    return config.get("ETL_LEDGER_SCHEMA")


def ledger_table(name: str) -> sql.Identifier:
    """``sql.Identifier(<ledger schema>, name)`` of a table declared in :mod:`loader.ledger`, for the
    hand-written SQL of the psycopg hot path; a name the ledger does not declare raises ValueError.

    Example::

        sql.SQL("SELECT status FROM {} WHERE etl_job_id = %s").format(ledger_table("runs"))
    """
    from . import ledger  # ledger imports this module (and states, which imports it too)

    table = ledger.metadata.tables.get(name)
    if table is None:
        raise ValueError(f"no ledger table {name!r}: loader/ledger.py declares "
                         f"{', '.join(sorted(ledger.metadata.tables))}")
    return sql.Identifier(ledger_schema(), table.name)


_rendered: dict[tuple[Any, ...], bytes] = {}


def ledger_sql(template: sql.SQL, *tables: str, **named: str) -> bytes:
    """``template`` with the ledger's names filled in, rendered to bytes once per ledger schema: for the
    statements every batch runs.

    Positional and keyword values name ledger tables (as :func:`ledger_table`); ``{next}`` is
    :func:`next_change`. psycopg renders a composed statement again on each execute (about 80 us: every
    identifier escaped, the placeholders parsed again for what is a new object); rendered bytes go straight
    to its cache of parsed queries (about 6 us). ``template`` must be a module constant: the cache knows it
    by ``id()`` and keeps it (a template built per call would be rendered and kept on every call).

    Example::

        _STATUS = sql.SQL("SELECT status FROM {} WHERE etl_job_id = %s")  # at module level
        conn.execute(ledger_sql(_STATUS, "runs"), [job])
    """
    key = (id(template), ledger_schema(), tables, *named.items())
    text = _rendered.get(key)
    if text is None:
        composed = template.format(*map(ledger_table, tables), **{k: ledger_table(v) for k, v in named.items()},
                                   next=next_change())
        text = _rendered[key] = composed.as_bytes(None)
        _keep_templates.append(template)  # its id stays its own while the process lives
    return text


#: The templates :func:`ledger_sql` rendered (module constants, a few dozen).
_keep_templates: list[sql.SQL] = []


def next_change() -> sql.Composed:
    """``nextval(...)`` of the ledger's change sequence: every ledger write takes a new number, so
    "what changed since N" (the console's cheap poll) is one index lookup."""
    from . import ledger

    return sql.SQL("nextval({})").format(sql.Literal(f'"{ledger_schema()}".{ledger.change_seq.name}'))


def set_read_timeout(seconds: float | None) -> None:
    """Have PostgreSQL cancel this process's reads that run longer than ``seconds`` (None or 0: no limit).

    The console turns it on (``ETL_CONSOLE_STATEMENT_TIMEOUT``) so that no page, grid page, batch detail
    or download holds the database for long; workers never do, since a batch may rightly run minutes.
    It covers the connections that read: those SQLAlchemy borrows from the pool (:func:`get_engine`: run
    contract, grid, change signature) and :func:`dedicated_connection` (downloads). A connection lent by
    :func:`connection` (start, retry, cancel, loading) keeps the writes' limits, so an action is never
    cut short. A pooled session is switched only when it passes from one use to the other (one
    ``set_config`` / ``RESET`` round trip), so the console's reads, nearly all its traffic, pay nothing.
    Those reads also run without parallel workers (one core each). A canceled statement raises
    SQLSTATE 57014, which :func:`wrap_db_error` turns into a TransientDbError saying so.

    Example::

        db.set_read_timeout(config.get_float("ETL_CONSOLE_STATEMENT_TIMEOUT"))
    """
    global _read_timeout_ms
    ms = round((seconds or 0) * 1000)
    if ms < 0:
        raise ValueError(f"a statement timeout cannot be negative, found {seconds!r}")
    with _lock:
        _read_timeout_ms = ms


def _timeout_options(ms: int) -> dict[str, str]:
    """The session limits, then (for the console's reads) its own statement timeout, which wins (the last -c)."""
    if not ms:
        return {"options": session_timeouts()}
    # Many small reads at once, each on one core: parallel workers would only add processes that
    # compete with Start, Retry and Cancel for the same cores.
    return {"options": f"{session_timeouts()} -c statement_timeout={ms} -c max_parallel_workers_per_gather=0"}


def session_timeouts() -> str:
    """The loader's session limits as libpq ``options`` (sent at connect: no round trip).

    ETL_STATEMENT_TIMEOUT, ETL_LOCK_TIMEOUT and ETL_IDLE_IN_TRANSACTION_TIMEOUT (seconds; 0: none). A batch
    blocked on a lock then fails its attempt after a minute (55P03, retried) instead of holding its worker
    for the whole queue job timeout; a statement cancelled by the timeout (57014) is retried too.
    """
    limits = {"statement_timeout": "ETL_STATEMENT_TIMEOUT", "lock_timeout": "ETL_LOCK_TIMEOUT",
              "idle_in_transaction_session_timeout": "ETL_IDLE_IN_TRANSACTION_TIMEOUT"}
    return " ".join(f"-c {name}={round(config.get_float(setting) * 1000)}" for name, setting in limits.items())


#: How often a running statement's session checks that its client is still there (ms).
CLIENT_CHECK_MS = 2000
_CHECK_CLIENT = sql.SQL("SELECT set_config('client_connection_check_interval', %s, false)")


def check_client(conn: psycopg.Connection[Any]) -> None:
    """Have the session check every CLIENT_CHECK_MS that its client is there, where the server can.

    A session whose process died (a worker killed while its batch waits on a lock or runs a long
    statement) then ends within seconds instead of at its statement's timeout, and with it the locks it
    holds on the batch's ledger row: the reconciler gives the batch back once the heartbeat is stale,
    not a lock timeout later. ``client_connection_check_interval`` is PostgreSQL 14's, and only where
    the server can poll a socket for a hang-up (Linux): set after connecting, never in the startup
    packet, where an unknown or refused setting would refuse the connection (older servers, PgBouncer).
    """
    if conn.info.server_version < 140000:
        return
    try:
        conn.execute(_CHECK_CLIENT, [str(CLIENT_CHECK_MS)])
    except psycopg.Error:  # refused on this platform, or by a pooler: the timeouts still end the session
        if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
            conn.rollback()


_READ_LIMITS = sql.SQL("SELECT set_config('statement_timeout', %s, false), "
                       "set_config('max_parallel_workers_per_gather', '0', false)")
#: Back to the values of the session's startup packet (:func:`session_timeouts`).
_WRITE_LIMITS = sql.SQL("RESET statement_timeout; RESET max_parallel_workers_per_gather")


def _limit_reads(conn: psycopg.Connection[Any], ms: int) -> None:
    """Put a pooled session (autocommit, idle) under the read limit ``ms`` (0: the writes' limits).

    A round trip only when the session was last used the other way; session-level (``set_config(...,
    false)`` outside a transaction), so it outlives the borrow and the next borrower of the same kind
    finds it set.
    """
    if _session_limit.get(conn, 0) == ms:
        return
    if ms:
        conn.execute(_READ_LIMITS, [str(ms)])
        _session_limit[conn] = ms
    else:
        conn.execute(_WRITE_LIMITS)
        del _session_limit[conn]


def get_pool(url: str | None = None) -> ConnectionPool:
    """This process's connection pool (a new one after fork: sockets are never shared).

    Its ``ETL_DB_POOL_SIZE`` connections are all the process opens to the database, besides the
    :func:`dedicated_connection` of a download or of a wait for a run's end: the engine (:func:`get_engine`)
    borrows from it too.
    ``close_returns``: ``close()`` on a borrowed connection gives it back, which is how SQLAlchemy
    returns one.
    """
    url = libpq_url(url or config.database_url())
    key = (os.getpid(), url)
    with _lock:
        pool = _pools.get(key)
        if pool is None:
            pool = ConnectionPool(
                url, min_size=0, max_size=config.get_int("ETL_DB_POOL_SIZE", minimum=1),
                kwargs={"autocommit": True, "application_name": "dataloader", "options": session_timeouts()},
                configure=check_client,
                check=_check_unless_fresh, open=True, timeout=30, reconnect_timeout=60,
                close_returns=True,
            )
            _pools[key] = pool
        return pool


def _check_unless_fresh(conn: psycopg.Connection[Any]) -> None:
    """The pool's check of a connection it lends, skipped for one given back moments ago when the borrower
    accepts that (see FRESH_CONNECTION_SECONDS)."""
    if getattr(_borrowing, "skip_fresh_check", False):
        returned = _returned_at.get(conn)
        if returned is not None and time.monotonic() - returned < FRESH_CONNECTION_SECONDS:
            return
    ConnectionPool.check_connection(conn)


@contextmanager
def connection(url: str | None = None, *, skip_fresh_check: bool = False) -> Iterator[psycopg.Connection[Any]]:
    """A pooled autocommit connection under the writes' limits; use ``with conn.transaction():`` for atomic work.

    ``skip_fresh_check``: a connection given back moments ago comes without the pool's check (a round trip);
    for a borrower whose first statement fails safely, as a transient error, when its session is gone.
    """
    pool = get_pool(url)
    with ExitStack() as stack:
        _borrowing.skip_fresh_check = skip_fresh_check
        try:
            conn = stack.enter_context(pool.connection())
        finally:
            _borrowing.skip_fresh_check = False  # borrows made inside the block are checked
        if not conn.autocommit:  # its last user left it out of autocommit
            conn.autocommit = True
        _limit_reads(conn, 0)
        try:
            yield conn
        finally:
            if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                _returned_at.pop(conn, None)  # broken, or given back mid-transaction: checked next time
            else:
                _returned_at[conn] = time.monotonic()


@contextmanager
def dedicated_connection(url: str | None = None, *, application_name: str = "dataloader-stream"
                         ) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection of its own, outside the pool, closed on exit, under the read timeout.

    For long streams (downloads) and long waits (``LISTEN`` for a run's end): a client that reads slowly or
    waits then holds no connection that starting, retrying or canceling a run needs. Connection failures
    raise TransientDbError.

    Example::

        with dedicated_connection() as conn:
            conn.execute("SELECT 1")
    """
    try:
        conninfo = make_conninfo(libpq_url(url or config.database_url()), application_name=application_name,
                                 **_timeout_options(_read_timeout_ms))
        conn = psycopg.connect(conninfo, autocommit=True)
    except psycopg.Error as exc:
        raise wrap_db_error(exc) from exc
    try:
        yield conn
    finally:
        conn.close()


class PooledDialect(PGDialect_psycopg):
    """SQLAlchemy's psycopg dialect over connections borrowed from :func:`get_pool`.

    SQLAlchemy sees each borrow as a new connection (``NullPool``) and would run its per-connection
    setup every time (the stock dialect adds a notice handler to the psycopg connection at each one, a
    list that would grow for the connection's whole life); the pool sets its connections up once.
    """

    supports_statement_cache = True  # what it compiles is the stock dialect's: cache it as SQLAlchemy does

    def on_connect(self) -> None:
        return None

    def do_close(self, dbapi_connection: Any) -> None:
        """Give the connection back to the pool (``close_returns``) in autocommit, as it was lent.

        SQLAlchemy has rolled back by now; a connection still in a transaction (a failed rollback) goes
        back as it is, and the pool rolls it back or discards it.
        """
        if dbapi_connection.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            dbapi_connection.autocommit = True
        dbapi_connection.close()


sa.dialects.registry.register("postgresql.dataloader", __name__, "PooledDialect")


#: How long a borrow by this thread may wait for a free connection (None: the pool's own timeout); set by
#: :func:`spare_connection` for its borrow only.
_borrow_wait: ContextVar[float | None] = ContextVar("borrow_wait", default=None)


def _borrow(url: str) -> psycopg.Connection[Any]:
    """A connection of the pool, for SQLAlchemy: under the read limit, out of autocommit.

    SQLAlchemy opens its transactions itself (BEGIN at the first statement) and rolls back when it
    gives the connection back; :meth:`PooledDialect.do_close` then returns it to the pool.
    """
    pool = _pools.get((os.getpid(), url)) or get_pool(url)  # ``url`` is libpq's already
    conn = pool.getconn(_borrow_wait.get())
    try:
        if not conn.autocommit:  # a user of connection() left it out of autocommit
            conn.autocommit = True
        _limit_reads(conn, _read_timeout_ms)
        conn.autocommit = False
    except BaseException:
        pool.putconn(conn)
        raise
    return conn


def get_engine(url: str | None = None) -> sa.engine.Engine:
    """This process's SQLAlchemy engine, with the ledger's schema mapped in, over this process's pool.

    It holds no connection of its own (``NullPool``): each ``engine.connect()`` borrows one from
    :func:`get_pool` (under the read timeout, if set) and gives it back on close, so the process never
    opens more than ``ETL_DB_POOL_SIZE`` connections, whichever API reads.

    Example::

        with db.get_engine().connect() as conn:
            conn.execute(sa.select(ledger.runs.c.status)).all()
    """
    url = libpq_url(url or config.database_url())
    schema = ledger_schema()
    key = (os.getpid(), url, schema)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = sa.create_engine(
                "postgresql+dataloader://", creator=lambda: _borrow(url), poolclass=sa.pool.NullPool,
            ).execution_options(schema_translate_map={None: schema})
            _engines[key] = engine
        return engine


@contextmanager
def spare_connection(wait: float) -> Iterator[sa.Connection | None]:
    """A connection of the engine for work done alongside a connection the caller holds, or None when the
    pool lends none within ``wait`` seconds.

    A caller that holds a connection must not wait the pool's whole timeout for a second one: every holder
    of the pool could be waiting so. It does the work on its own connection instead.

    Example::

        with spare_connection(0.05) as spare:
            target = spare if spare is not None else conn
    """
    token = _borrow_wait.set(wait)
    try:
        conn = get_engine().connect()
    except (PoolTimeout, sa.exc.DBAPIError) as exc:  # SQLAlchemy wraps what its creator raises
        if not isinstance(getattr(exc, "orig", exc), PoolTimeout):
            raise
        conn = None
    finally:
        _borrow_wait.reset(token)
    if conn is None:
        yield None
        return
    with conn:
        yield conn


def close_all() -> None:
    """Close this process's pools and engines (tests, and workers on shutdown)."""
    with _lock:
        for pool in _pools.values():
            pool.close()
        _pools.clear()
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, TransientDbError):
        return True
    orig = getattr(exc, "orig", None)  # SQLAlchemy wraps the driver's error
    if isinstance(orig, psycopg.Error):
        exc = orig
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate
        if state is None:
            # No SQLSTATE: the connection broke (server gone, socket closed, pool timeout).
            return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
        return state in TRANSIENT_SQLSTATES or state.startswith(TRANSIENT_CLASSES)
    from psycopg_pool import PoolTimeout

    return isinstance(exc, PoolTimeout | ConnectionError | TimeoutError)


def is_session_lost(exc: BaseException) -> bool:
    """The connection's session is gone (no SQLSTATE: the socket closed; 08: connection exception; 57P: the
    server ended it), as opposed to the database refusing or failing a statement (a narrower case of
    :func:`is_transient`)."""
    if not isinstance(exc, psycopg.OperationalError):
        return False
    return exc.sqlstate is None or exc.sqlstate.startswith(("08", "57P"))


def wrap_db_error(exc: BaseException, **context: object) -> LoaderError:
    """Turn a driver error into TransientDbError or PermanentDbError, password-free."""
    orig = getattr(exc, "orig", None)
    err = orig if isinstance(orig, psycopg.Error) else exc
    sqlstate = getattr(err, "sqlstate", None) or ""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    message = redact(first)
    if sqlstate == "57014" and _read_timeout_ms and "statement timeout" in message:
        return TransientDbError(
            f"the database did not answer within {_read_timeout_ms / 1000:g} s (the console's statement timeout) "
            "and the query was canceled: it is busy, or the request asks for too much; try again in a moment "
            "or narrow the filter", sqlstate=sqlstate, timeout=True, **context)
    if is_transient(err):
        return TransientDbError(f"database error, will retry: {message}", sqlstate=sqlstate, **context)
    return PermanentDbError(f"database error {sqlstate or ''}: {message}".replace("  ", " "),
                            sqlstate=sqlstate, **context)
