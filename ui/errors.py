"""One place that turns the loader's errors into what the user sees."""

from __future__ import annotations

import sqlalchemy as sa

from loader import LoaderError, db

from .text import alert


def user_message(exc: BaseException) -> str:
    """The text to show for an error the console expects (LoaderError or a database outage)."""
    if isinstance(exc, LoaderError):
        return str(exc)
    if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
        return str(db.wrap_db_error(exc))
    raise exc


def show_error(exc: BaseException, *, where: str = "") -> None:
    """Show a LoaderError (or a database outage) in an error box, as text; re-raise anything else.

    Example::

        try:
            loader.start_run(job)
        except LoaderError as exc:
            show_error(exc, where="Start Load")
    """
    message = user_message(exc)
    prefix = f"{where}: " if where else ""
    alert(message, prefix=prefix)
