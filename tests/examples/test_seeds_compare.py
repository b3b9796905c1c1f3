"""examples/seeds/compare.py without models: the distillation teacher sees what ICL sees, every run names a
registered method, the table lists every run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from peftmerge.data.prompts import with_demos
from peftmerge.data.tasks import Task
from peftmerge.train import methods

spec = importlib.util.spec_from_file_location(
    "seeds_compare", Path(__file__).resolve().parents[2] / "examples" / "seeds" / "compare.py")
compare = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = compare  # dataclasses look their module up
spec.loader.exec_module(compare)

ROWS = [{"text": "a fine film", "label": "positive"}, {"text": "dull", "label": "negative"},
        {"text": "the plot drags", "label": "negative"}]


def test_teacher_prompt_is_the_icl_prefix():
    # context distillation's teacher = the base with exactly the demonstrations ICL puts before a row
    task = Task("sst2", None, ROWS, compare.LABELS, compare.TEMPLATE, {})
    demos, row = ROWS[:2], ROWS[2]
    icl = with_demos(task, row, demos)
    assert icl == compare.teacher_prompt(demos) + "\n\n" + compare.TEMPLATE.format(text=row["text"])
    assert "### Response: positive\n\n### Instruction:" in icl


def test_runs_use_registered_methods_and_the_seed_lora_recipe():
    for run in compare.RUNS:
        if run.train:
            assert run.train["method"] in methods.names()
            assert (run.shape == "text2text") or not methods.get(run.train["method"]).causal_only
    lora = next(r for r in compare.RUNS if r.name == "lora").train
    assert (lora["r"], lora["alpha"], lora["target_modules"]) == (8, 16, ["q_proj", "v_proj"])


def test_markdown_has_a_line_per_run():
    rows = [{"name": "lora", "model": "smollm2", "accuracy": 0.8512, "ood_accuracy": 0.7, "trainable_params": 460800,
             "train_s": 12.4, "peak_rss_mb": 1500.2}]
    table = compare.markdown(rows).splitlines()
    assert table[2] == "| lora | smollm2 | 0.851 | 0.700 | 460,800 | 12 | 1500 |"
    assert len(table) == 3
