"""The Run Configuration's rules, checked on every rerun (before the engine checks them again)."""

from __future__ import annotations

from dataclasses import dataclass

from loader import config
from loader.catalog import JOB_NAME_RE
from loader.errors import ConfigError
from loader.runs import check_run_id

RUN_ID_HELP = "A UUID, or a slug: lower-case letters, digits, '-' and '_', starting with a letter or digit (max 63)"


@dataclass(frozen=True)
class RunConfig:
    """What the left panel holds; ``problems`` maps a field to the message shown next to it."""

    job: str | None
    run_id: str
    batch_size: int | None
    problems: dict[str, str]

    @property
    def valid(self) -> bool:
        return not self.problems


def check_config(job: str | None, run_id: str | None, batch_size: object, jobs: list[str]) -> RunConfig:
    """Every problem of the configuration, by field.

    Example::

        >>> check_config(None, "x y", 50, ["orders"]).problems["batch_size"]
        'Batch size must be from 100 to 10000, found 50'
    """
    problems: dict[str, str] = {}
    if not job:
        problems["job"] = "Choose an ETL job"
    elif job not in jobs:
        problems["job"] = "Unknown job: choose one of the configured jobs"
    text = (run_id or "").strip()
    run = text
    if not text:
        problems["run_id"] = "Run ID is required: " + RUN_ID_HELP
    else:
        try:
            run = check_run_id(text)
        except ConfigError:
            problems["run_id"] = f"Not a valid Run ID. {RUN_ID_HELP}"
    size: int | None = None
    if batch_size is None or batch_size == "":
        problems["batch_size"] = f"Batch size is required ({config.BATCH_SIZE_MIN} to {config.BATCH_SIZE_MAX})"
    else:
        try:
            size = config.check_batch_size(batch_size)
        except ConfigError as exc:
            problems["batch_size"] = str(exc)[0].upper() + str(exc)[1:]
    return RunConfig(job, run, size, problems)


def default_batch_size() -> tuple[int, str | None]:
    """ETL_BATCH_SIZE when valid, else 1000 with a message saying why the env value was ignored."""
    try:
        return config.default_batch_size(), None
    except ConfigError as exc:
        return config.DEFAULT_BATCH_SIZE, str(exc)


@dataclass(frozen=True)
class SizeDefault:
    """The Batch Size field's default and the helper text shown under it (the CLI's rule: job, env, 1000)."""

    value: int
    helper: str
    env_note: str | None


def batch_size_default(job: str | None, job_batch_size: int | None) -> SizeDefault:
    """The job's catalog ``batch_size``, else ETL_BATCH_SIZE, else 1000; the helper names the env value in force.

    Example::

        >>> batch_size_default("orders", 500).value
        500
    """
    env_value, env_note = default_batch_size()
    helper = f"Env: ETL_BATCH_SIZE = {env_value}"
    if job and job_batch_size is not None:
        return SizeDefault(job_batch_size, f"{helper}; job {job} sets batch_size = {job_batch_size} in the catalog, "
                                           f"which comes first. Allowed: {config.BATCH_SIZE_MIN} to "
                                           f"{config.BATCH_SIZE_MAX}.", env_note)
    return SizeDefault(env_value, f"{helper} (in force). Allowed: {config.BATCH_SIZE_MIN} to "
                                  f"{config.BATCH_SIZE_MAX}.", env_note)


def run_id_taken(cfg: RunConfig, found: dict[str, object] | None, started: str) -> RunConfig:
    """``cfg`` with a Run ID problem when ``found`` (the job's run of that id) exists; ``started`` is its local time.

    Example::

        cfg = run_id_taken(cfg, loader.find_run(cfg.job, cfg.run_id), "2026-11-27 17:03:04 CET")
    """
    if found is None:
        return cfg
    message = f"Run ID {cfg.run_id} is already used by a run started {started} ({found['status']}): choose another"
    return RunConfig(cfg.job, cfg.run_id, cfg.batch_size, {**cfg.problems, "run_id": message})


def valid_job_param(value: str | None) -> str | None:
    return value if value and JOB_NAME_RE.match(value) else None


def valid_run_param(value: str | None) -> str | None:
    if not value:
        return None
    try:
        return check_run_id(value)
    except ConfigError:
        return None
