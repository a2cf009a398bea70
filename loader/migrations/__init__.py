"""Alembic migrations of the ledger schema (``ETL_LEDGER_SCHEMA``), run by ``dataloader initdb``."""
