"""The package's import contracts (pyproject.toml, ``[tool.importlinter]``): layers point one way (io -> data ->
merge -> train | routing -> evaluate -> search -> analysis -> hub -> cli), the merge methods never import the engine,
a merge reaches methods and engine through execute only, and no package imports itself back. Checked with
import-linter, as ``lint-imports`` does."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "pyproject.toml"

pytest.importorskip("importlinter")


def lint(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package found under ``root``, with the project's contracts."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename=sys.argv[1]))"
    return subprocess.run([sys.executable, "-c", code, str(CONFIG)], cwd=root, env=env, capture_output=True,
                          text=True)


def test_the_import_contracts_hold():
    r = lint(ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "4 kept, 0 broken" in r.stdout


@pytest.mark.parametrize("module,line,broken", [
    ("io/meta.py", "from ..merge import combine", "Layers"),  # an upward import
    ("merge/methods/ties.py", "from ..engine import blocked", "methods (math) never import the engine"),
    ("merge/plan.py", "from . import combine", "No import cycles"),  # combine imports plan
    ("merge/combine.py", "from .engine import blocked", "only through execute"),
])
def test_a_bad_import_breaks_a_contract(tmp_path, module, line, broken):
    shutil.copytree(ROOT / "peftmerge", tmp_path / "peftmerge", ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / "peftmerge" / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    r = lint(tmp_path)
    verdicts = " ".join(r.stdout.split("Contracts\n---------")[-1].split("Contracts:")[0].split())  # one line each
    assert r.returncode != 0, r.stdout[-3000:]
    status = {name.strip(): verdict for name, verdict in re.findall(r"(.*?) (KEPT|BROKEN)", verdicts)}
    assert [verdict for name, verdict in status.items() if broken in name] == ["BROKEN"], verdicts
