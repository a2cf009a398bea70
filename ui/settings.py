"""Settings for the console: `.streamlit/secrets.toml` values become environment variables."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from loader.config import SETTINGS

ROOT = Path(__file__).resolve().parent.parent
SECRETS_FILE = ROOT / ".streamlit" / "secrets.toml"


def apply_secrets(path: Path = SECRETS_FILE) -> list[str]:
    """Copy the product's settings found in ``secrets.toml`` (top level, or under ``[dataloader]``)
    into ``os.environ`` unless the environment already sets them; returns the names copied.

    Streamlit users keep DATABASE_URL and friends in secrets.toml; the engine reads the
    environment, so both places work. The environment wins.

    Example::

        # .streamlit/secrets.toml
        DATABASE_URL = "postgresql://etl@db/warehouse"
    """
    if not path.is_file():
        return []
    with path.open("rb") as f:
        data = tomllib.load(f)
    section = data.get("dataloader")
    values = {**data, **(section if isinstance(section, dict) else {})}
    copied = []
    for setting in SETTINGS:
        value = values.get(setting.name)
        if isinstance(value, str | int | float) and not isinstance(value, bool) and not os.environ.get(setting.name):
            os.environ[setting.name] = str(value)
            copied.append(setting.name)
    return copied
