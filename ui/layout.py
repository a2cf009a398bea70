"""Page-wide CSS: two columns from 1024 px, stacked below; visible focus; a screen-reader-only class."""

from __future__ import annotations

import streamlit as st

CSS = """
<style>
/* Two columns at >= 1024 px; stacked below (Streamlit alone stacks only under 640 px). */
@media (max-width: 1023.98px) {
  .st-key-dl-layout > div > [data-testid="stHorizontalBlock"],
  .st-key-dl-layout [data-testid="stHorizontalBlock"]:first-of-type {
    flex-direction: column !important; flex-wrap: wrap !important; }
  .st-key-dl-layout [data-testid="stHorizontalBlock"]:first-of-type > [data-testid="stColumn"] {
    width: 100% !important; flex: 1 1 100% !important; min-width: 100% !important; }
}
/* The grid keeps its column widths and scrolls sideways on narrow screens. */
.st-key-dl-grid-wrap { overflow-x: auto; }
/* Keyboard focus always visible. */
a:focus-visible, button:focus-visible, input:focus-visible, [role="option"]:focus-visible,
[tabindex]:focus-visible, summary:focus-visible {
  outline: 3px solid #1d4ed8 !important; outline-offset: 2px !important; }
.st-key-dl-cards [data-testid="stMetricValue"] { font-size: 1.35rem; }
.dl-sr-only { position: absolute !important; width: 1px; height: 1px; padding: 0; margin: -1px;
  overflow: hidden; clip: rect(0, 0, 0, 0); white-space: nowrap; border: 0; }
</style>
"""


def inject_css() -> None:
    st.html(CSS)
