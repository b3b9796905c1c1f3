"""examples/multitask/run.py writes only its own parts of docs/results.md (between its markers), so the sections
written by hand or by the other scripts survive a rerun."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("multitask_run", ROOT / "examples" / "multitask" / "run.py")
run = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = run
spec.loader.exec_module(run)


def test_splice_replaces_only_between_its_markers():
    text = "# R\n\nhand\n<!-- run.py:tables -->\nold\n<!-- /run.py:tables -->\n\nmore hand\n"
    out = run.splice(text, "tables", "new\nrows")
    assert out == "# R\n\nhand\n<!-- run.py:tables -->\nnew\nrows\n<!-- /run.py:tables -->\n\nmore hand\n"
    assert run.splice(out, "tables", "new\nrows") == out


def test_a_page_without_the_markers_is_refused_not_overwritten():
    with pytest.raises(SystemExit, match="no <!-- run.py:commands -->"):
        run.splice("# hand-written only\n", "commands", "x")


@pytest.mark.parametrize("name", ["header", "tables", "commands"])
def test_results_page_and_template_carry_every_marker(name):
    for text in ((ROOT / "docs" / "results.md").read_text(), run.TEMPLATE):
        assert text.count(f"<!-- run.py:{name} -->") == 1 and text.count(f"<!-- /run.py:{name} -->") == 1
