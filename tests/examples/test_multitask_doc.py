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


def _spaces():
    spec = importlib.util.spec_from_file_location("multitask_spaces", ROOT / "examples" / "multitask" / "spaces.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_each_spaces_label_owns_one_section_and_the_rest_of_the_page_is_kept(tmp_path):
    spaces = _spaces()
    doc = tmp_path / "results.md"
    doc.write_text("# R\n\nhand\n")
    for label, body in (("minilm", "one"), ("smollm2", "two"), ("minilm", "three")):
        spaces.write_section(doc, spaces.mark(label), f"{spaces.mark(label)}\n{body}\n{spaces.mark(label)}")
    text = doc.read_text()
    assert text.startswith("# R\n\nhand\n") and "one" not in text
    assert text.index("three") < text.index("two")  # rewritten in place, not appended again
    for label in ("minilm", "smollm2"):
        assert text.count(spaces.mark(label)) == 2


def test_the_results_page_has_one_section_per_spaces_label():
    text = (ROOT / "docs" / "results.md").read_text()
    spaces = _spaces()
    for label in ("minilm", "minilm-seed0", "minilm-seed1", "smollm2"):
        assert text.count(spaces.mark(label)) == 2, label
