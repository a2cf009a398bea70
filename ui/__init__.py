"""The console's Streamlit helpers: formatting, error display, the batches grid and the run monitor."""

from __future__ import annotations

from .errors import show_error

__all__ = ["show_error"]
