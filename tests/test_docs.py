"""The README documents every setting, every CLI command and every run and batch state."""

from __future__ import annotations

from pathlib import Path

import pytest

from loader.cli import build_parser
from loader.config import SETTINGS
from loader.states import BatchStatus, RunStatus

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_every_setting_is_documented(setting):
    assert f"| `{setting.name}` |" in README


def test_every_cli_command_is_documented():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        assert f"dataloader {name}" in README, name


@pytest.mark.parametrize("state", [*RunStatus, *BatchStatus], ids=lambda s: s.value)
def test_every_state_is_documented(state):
    assert f"| `{state.value}" in README


def test_every_test_named_in_the_guarantees_exists():
    import re

    section = README.split("## Guarantees", 1)[1]
    named = set(re.findall(r"`(test_\w+)`", section))
    sources = "".join(p.read_text() for p in Path(__file__).parent.rglob("test_*.py"))
    missing = [name for name in sorted(named) if f"def {name}(" not in sources]
    assert named and not missing


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_every_setting_is_in_env_example(setting):
    example = (Path(__file__).resolve().parent.parent / ".env.example").read_text()
    assert f"\n{setting.name}={setting.default}\n" in example
