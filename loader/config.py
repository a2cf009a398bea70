"""Settings as data: every environment variable the product reads, with its default and help."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: Smallest and largest batch a run may use; outside this range start_run refuses.
BATCH_SIZE_MIN = 100
BATCH_SIZE_MAX = 10_000
#: Batch size when neither the job nor ETL_BATCH_SIZE sets one.
DEFAULT_BATCH_SIZE = 1000
#: The file in ETL_DATA_DIR where the local stack (`dataloader up`, ``devstack``) names the embedded
#: servers it runs: ``{"database_url": ..., "redis_url": ...}``, read here as data.
DISCOVERY_FILE = "services.json"


@dataclass(frozen=True)
class Setting:
    """One environment variable: its name, default (as text) and what it does."""

    name: str
    default: str
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("DATABASE_URL", "", "PostgreSQL URL for the ledger and staging tables; "
            "unset: `dataloader up` / `make test` start an embedded server under ETL_DATA_DIR"),
    Setting("REDIS_URL", "", "Redis URL for the RQ queue; unset: an embedded Redis is started"),
    Setting("ETL_BATCH_SIZE", str(DEFAULT_BATCH_SIZE),
            f"records per batch when the job sets none ({BATCH_SIZE_MIN}..{BATCH_SIZE_MAX})"),
    Setting("ETL_JOBS_FILE", "jobs.toml", "the job catalog (TOML), relative to the working directory"),
    Setting("ETL_QUEUE", "dataloader", "name of the RQ queue the runs and batches go through"),
    Setting("ETL_LEDGER_SCHEMA", "etl_ledger", "PostgreSQL schema holding the ledger tables"),
    Setting("ETL_MAX_ATTEMPTS", "4", "attempts per batch for transient database errors, when the job sets none"),
    Setting("ETL_RETRY_BASE_SECONDS", "0.5", "first backoff delay between attempts (doubles, with jitter)"),
    Setting("ETL_RETRY_MAX_SECONDS", "10", "longest backoff delay between two attempts"),
    Setting("ETL_DB_OUTAGE_SECONDS", "120",
            "how long a batch waits for an unreachable database before giving it back to the reconciler"),
    Setting("ETL_MAX_RECORD_BYTES", str(64 * 1024 * 1024),
            "longest record (source line or JSON array element) read and validated; a longer one is a json_shape "
            "error, read past without holding it in memory"),
    Setting("ETL_STATEMENT_TIMEOUT", "300",
            "seconds one statement of the loader (a batch's COPY or upsert, a ledger write) may run before "
            "PostgreSQL cancels it; the attempt is then retried as a transient error"),
    Setting("ETL_LOCK_TIMEOUT", "60",
            "seconds the loader waits for a lock (a target row another writer holds) before the attempt is "
            "retried as a transient error"),
    Setting("ETL_IDLE_IN_TRANSACTION_TIMEOUT", "300",
            "seconds a loader connection may sit idle inside a transaction before PostgreSQL ends its session"),
    Setting("ETL_WORKER_STALE_SECONDS", "15",
            "seconds without a heartbeat (workers beat every 3 s) after which a worker is presumed lost: its "
            "batch is queued again, or fails as worker_lost in its last attempt (at least 6)"),
    Setting("ETL_JOB_TIMEOUT", "1800", "seconds an RQ job (planning, one batch, or a first delivery of consecutive "
            "small batches, about 1,000 records in all) may run before it is killed"),
    Setting("ETL_CONSOLE_URL", "http://localhost:8501",
            "public base URL of the console; logs_url and metrics_download_url start with it"),
    Setting("ETL_DB_POOL_SIZE", "4", "largest number of pooled PostgreSQL connections per process (the "
            "psycopg hot path and SQLAlchemy's reads share them; a download opens one of its own)"),
    Setting("ETL_ALLOWED_HOSTS", "",
            "more Host names the console answers (comma-separated), besides localhost, 127.0.0.1, [::1] and "
            "the host of ETL_CONSOLE_URL; any other Host gets 400"),
    Setting("ETL_CONSOLE_STATEMENT_TIMEOUT", "5",
            "seconds a console query (page, grid, detail) may run before PostgreSQL cancels it"),
    Setting("ETL_CONSOLE_MAX_REQUESTS", "2",
            "expensive data requests (grid pages, batch details, downloads) one console process serves at once; "
            "more get 503 with a message"),
    Setting("ETL_CONSOLE_MAX_STREAMS", "200",
            "run event streams (Server-Sent Events) one console process keeps open at once; more get 503"),
    Setting("ETL_DATA_DIR", ".data", "where embedded PostgreSQL and Redis keep their data"),
    Setting("ETL_ACTOR", "", "who the CLI and the Python API act as in the audit trail; unset: the OS user name"),
    Setting("ETL_AUTH", "none", "how the console identifies people: none (nobody; anyone reaching it can act), "
            "oidc (Streamlit's st.login, [auth] in .streamlit/secrets.toml) or proxy (a header set by an "
            "authenticating reverse proxy)"),
    Setting("ETL_AUTH_HEADER", "X-Forwarded-Email", "under ETL_AUTH=proxy, the request header holding the "
            "person's e-mail"),
    Setting("ETL_TRUSTED_PROXIES", "127.0.0.1/32,::1/128", "under ETL_AUTH=proxy, the networks (CIDR, "
            "comma-separated) whose requests' identity header is believed; from any other peer it is ignored"),
    Setting("ETL_VIEWERS", "*", "who may look at runs (comma-separated e-mails and @domain suffixes; * anyone "
            "identified)"),
    Setting("ETL_OPERATORS", "", "who may start, retry, cancel and download rejected records (same syntax); "
            "unset: everybody under ETL_AUTH=none, nobody under oidc and proxy"),
)

_BY_NAME = {s.name: s for s in SETTINGS}


def get(name: str) -> str:
    """The current value of a setting: the environment, else its default.

    Read at call time (not import time) so a notebook or a test can change the environment.

    Example::

        >>> get("ETL_QUEUE")
        'dataloader'
    """
    setting = _BY_NAME[name]
    value = os.environ.get(name, "").strip()
    return value or setting.default


def get_int(name: str, *, minimum: int = 0) -> int:
    raw = get(name)
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, found {raw!r}", setting=name) from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, found {value}", setting=name)
    return value


def get_float(name: str) -> float:
    raw = get(name)
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, found {raw!r}", setting=name) from None
    if value < 0:
        raise ConfigError(f"{name} must not be negative, found {value}", setting=name)
    return value


def check_batch_size(value: object) -> int:
    """Return ``value`` as a batch size, or raise ConfigError saying the allowed range.

    Example::

        >>> check_batch_size("500")
        500
    """
    try:
        size = int(str(value).strip())
    except ValueError:
        raise ConfigError(
            f"batch size must be a whole number from {BATCH_SIZE_MIN} to {BATCH_SIZE_MAX}, found {value!r}"
        ) from None
    if not BATCH_SIZE_MIN <= size <= BATCH_SIZE_MAX:
        raise ConfigError(
            f"batch size must be from {BATCH_SIZE_MIN} to {BATCH_SIZE_MAX}, found {size}", batch_size=size
        )
    return size


def default_batch_size() -> int:
    """ETL_BATCH_SIZE when set (checked against the allowed range), else 1000."""
    raw = get("ETL_BATCH_SIZE")
    try:
        return check_batch_size(raw)
    except ConfigError as exc:
        raise ConfigError(f"ETL_BATCH_SIZE: {exc}", setting="ETL_BATCH_SIZE") from None


def data_dir() -> Path:
    """Where embedded servers keep their data: ETL_DATA_DIR (relative to the working directory), else
    ``.data`` in the project."""
    raw = os.environ.get("ETL_DATA_DIR", "").strip()
    return Path(raw).expanduser().resolve() if raw else PROJECT_ROOT / ".data"


def discovered_url(key: str) -> str:
    """The URL (``database_url`` or ``redis_url``) of an embedded server `dataloader up` / `make run` is
    running, as its discovery file names it, when that server answers; else ''.

    This is how a second terminal's `dataloader start` or a notebook finds the servers `make run`
    started, without anyone exporting their URLs (and without importing the local stack).

    Example::

        >>> discovered_url("database_url")  # doctest: +SKIP
        'postgresql://postgres@/postgres?host=/work/p/.data/postgres&port=5432'
    """
    try:
        found = json.loads((data_dir() / DISCOVERY_FILE).read_text())
    except (OSError, ValueError):
        return ""
    url = found.get(key) if isinstance(found, dict) else None
    if not isinstance(url, str) or not url:
        return ""
    answers = postgres_answers if key == "database_url" else redis_answers
    return url if answers(url) else ""


def postgres_answers(url: str) -> bool:
    """Whether the PostgreSQL at ``url`` takes a connection and a query within seconds (a discovery
    file outlives a crashed server; ``devstack`` waits on it while a server starts)."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def redis_answers(url: str) -> bool:
    """Whether the Redis at ``url`` (``redis://...`` or ``unix://<socket>``) answers PING within seconds."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def database_url() -> str:
    url = get("DATABASE_URL") or discovered_url("database_url")
    if not url:
        raise ConfigError(
            "DATABASE_URL is not set and no `dataloader up` is running here: point it at PostgreSQL "
            "(postgresql://user@host:5432/db), or run `make run` / `dataloader up` first"
        )
    return url


def redis_url() -> str:
    url = get("REDIS_URL") or discovered_url("redis_url")
    if not url:
        raise ConfigError(
            "REDIS_URL is not set and no `dataloader up` is running here: point it at Redis "
            "(redis://127.0.0.1:6379/0), or run `make run` / `dataloader up` first"
        )
    return url


def jobs_file() -> Path:
    return Path(get("ETL_JOBS_FILE")).expanduser()
