"""Alembic's entry for the ledger: configured by loader.ledger (no alembic.ini), online only.

``loader.ledger.initdb`` passes its connection (holding the initdb advisory lock, inside its
transaction, with the ledger schema mapped in) as ``config.attributes["connection"]``; the version
table lives in the ledger schema too, so two ledgers in one database never share it.
"""

from __future__ import annotations

from alembic import context

from loader import db

connection = context.config.attributes.get("connection")
if connection is None:  # `alembic -c ...` by hand: this process's engine, one transaction
    with db.get_engine().begin() as connection:
        context.configure(connection=connection, version_table_schema=db.ledger_schema())
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, version_table_schema=db.ledger_schema())
    with context.begin_transaction():
        context.run_migrations()
