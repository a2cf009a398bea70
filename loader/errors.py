"""The one exception family of the loader: every error raised on purpose is a LoaderError."""

from __future__ import annotations


class LoaderError(Exception):
    """Base for every error the loader raises on purpose.

    ``str(exc)`` is for people (what, where, what next); ``code`` and ``context`` go to logs and
    the ledger. Instances stay picklable so RQ can carry them between processes.

    Example::

        raise CatalogError("job 'orders': unknown key 'batchsize'", job="orders", key="batchsize")
    """

    code = "loader_error"

    def __init__(self, message: str, **context: object) -> None:
        super().__init__(message)
        self.message = message
        self.context = context

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.message, self.context))


def _rebuild(cls: type[LoaderError], message: str, context: dict[str, object]) -> LoaderError:
    return cls(message, **context)


class ConfigError(LoaderError):
    """A setting has a value the loader cannot use (a batch size out of range, a bad URL)."""

    code = "config"


class CatalogError(LoaderError):
    """The job catalog (jobs.toml) or one of its jobs is broken."""

    code = "catalog"


class JobNotFound(LoaderError):
    """No job of that name in the catalog."""

    code = "job_not_found"


class RunNotFound(LoaderError):
    """No run with that etl_job_id and etl_run_id in the ledger."""

    code = "run_not_found"


class RunConflict(LoaderError):
    """The request does not fit the run's state (a second run in progress, retry of a running run)."""

    code = "run_conflict"


class SourceError(LoaderError):
    """A source file is missing, unreadable, changed since planning, or not of the declared format."""

    code = "source"


class SourceChanged(SourceError):
    """A batch's bytes are not those planned (size, mtime or checksum differ): failed for good, never retried,
    since every attempt would read the same changed file; a new run loads its current content."""

    code = "source_changed"


class TransientSourceError(SourceError):
    """A store error that may pass (an HTTP 5xx, 429 or 408, throttling, a connection reset or a timeout, after
    the store client's own retries): the batch is retried with backoff, as for a transient database error."""

    code = "source_transient"


class LedgerNotReady(LoaderError):
    """The ledger schema is missing or older than this code: run `dataloader initdb`."""

    code = "ledger_not_ready"


class TransientDbError(LoaderError):
    """A database error that may pass by itself (lost connection, deadlock...): retried."""

    code = "db_transient"


class JobTimeout(LoaderError):
    """The queue's job ran longer than ETL_JOB_TIMEOUT and was stopped: the attempt counts, the batch goes back
    to the queue (the worker raises a subclass that its queue library also knows as its own timeout)."""

    code = "job_timeout"


class PermanentDbError(LoaderError):
    """A database error that retrying will not fix; ``code`` names the SQLSTATE."""

    code = "db_error"


class ServiceError(LoaderError):
    """An embedded or configured service (PostgreSQL, Redis) cannot be started or reached."""

    code = "service"


class TargetTableError(LoaderError):
    """The staging table exists but cannot take upserts (no unique source_id, a missing column)."""

    code = "target_table"
