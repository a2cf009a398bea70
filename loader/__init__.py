"""Data Loader: load JSON records into PostgreSQL JSONB staging tables in batches, with a ledger."""

from __future__ import annotations

from .api import cancel_run, initdb, list_jobs, retry_run, start_run, wait_for_run, workers_alive
from .catalog import Catalog, JobSpec, load_catalog
from .contract import active_run, change_signature, find_run, ledger_version, run_contract
from .errors import (
    CatalogError,
    ConfigError,
    JobNotFound,
    LoaderError,
    RunConflict,
    RunNotFound,
    ServiceError,
    SourceError,
    TransientDbError,
)
from .exports import iter_logs_ndjson, iter_metrics_csv, iter_rejects_ndjson
from .follow import RunEvent, follow_run
from .ledger import BatchStatus, RunStatus
from .recent_runs import list_runs
from .runs import RunRef

__all__ = [
    "BatchStatus", "Catalog", "CatalogError", "ConfigError", "JobNotFound", "JobSpec", "LoaderError",
    "RunConflict", "RunEvent", "RunNotFound", "RunRef", "RunStatus", "ServiceError", "SourceError", "TransientDbError",
    "active_run", "cancel_run", "change_signature", "find_run", "follow_run", "initdb", "iter_logs_ndjson",
    "iter_metrics_csv", "iter_rejects_ndjson",
    "ledger_version", "list_jobs", "list_runs", "load_catalog", "retry_run", "run_contract", "start_run",
    "wait_for_run", "workers_alive",
]
