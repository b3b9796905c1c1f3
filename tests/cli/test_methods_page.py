"""``peftmerge methods``: every registered method with its parameters, and docs/methods.md generated from it."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from peftmerge.cli.main import main
from peftmerge.cli.methods import table
from peftmerge.merge import registry

DOC = Path(__file__).resolve().parents[2] / "docs" / "methods.md"


def test_the_methods_page_is_generated_from_the_registry():
    r = CliRunner().invoke(main, ["methods", "--markdown"])
    assert r.exit_code == 0 and r.stdout.strip() == table().strip()
    assert DOC.read_text().strip() == table().strip(), "regenerate: peftmerge methods --markdown > docs/methods.md"
    for m in registry.methods():
        line = next(row for row in table().splitlines() if row.startswith(f"| `{m.name}`"))
        assert all(f"`{p.name}={p.default}`" in line for p in m.params) and m.paper in line
