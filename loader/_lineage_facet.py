"""The custom OpenLineage run facet of the Data Loader (imports the client: load it only to send)."""

from __future__ import annotations

from typing import Any

import attr
from openlineage.client.event_v2 import RunEvent  # noqa: F401 - loaded with the facet (lineage.prepare)
from openlineage.client.facet_v2 import data_quality_assertions_dataset  # noqa: F401
from openlineage.client.generated.base import RunFacet

from .lineage import RUN_FACET_SCHEMA_URL


@attr.define
class DataLoaderRunFacet(RunFacet):
    """What a lineage backend cannot learn from the standard facets: the run's ledger id and its numbers.

    Its schema: schemas/openlineage/DataLoaderRunFacet.json (checked by tests/test_lineage.py).
    """

    etl_job_id: str
    etl_run_id: str
    status: str
    batch_size: int
    retry: int
    forced: bool
    metrics: dict[str, Any]
    error_code: str | None = attr.field(default=None)
    started_by: str | None = attr.field(default=None)

    @staticmethod
    def _get_schema() -> str:
        return RUN_FACET_SCHEMA_URL
