"""Training's evaluation schedule: light by default (one evaluation after training, on rows sized to the run),
the last step's weights kept unless the best checkpoint is asked for, and both said in the output and the metadata."""

from __future__ import annotations

import json
import os

from click.testing import CliRunner

from train_fixtures import make_bert, sentiment_rows, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peftmerge.train import TrainConfig  # noqa: E402
from peftmerge.train.trainer import eval_rows, training_args  # noqa: E402


def _cfg(**kw):
    return TrainConfig(**{**dict(model="m", data="d", task="t", out="o"), **kw})


def test_default_evaluation_is_sized_to_the_run():
    # a quarter of the rows trained on (steps x batch x grad_accum), within 32..500
    assert eval_rows(_cfg(max_steps=30, batch_size=8), n_train=10_000) == 60
    assert eval_rows(_cfg(max_steps=200, batch_size=8), n_train=10_000) == 400
    assert eval_rows(_cfg(max_steps=200, batch_size=32), n_train=10_000) == 500
    assert eval_rows(_cfg(max_steps=2, batch_size=8), n_train=10_000) == 32
    assert eval_rows(_cfg(epochs=1.0, batch_size=8), n_train=400) == 100
    # each row scored once per label word costs 1 + labels forward passes
    assert eval_rows(_cfg(max_steps=200, batch_size=8), n_train=10_000, label_words=3) == 100
    assert eval_rows(_cfg(max_steps=30, max_eval_samples=7), n_train=10_000) == 7


def test_no_evaluation_during_training_unless_the_best_checkpoint_is_kept():
    args = training_args(_cfg(max_steps=50), has_eval=True, shape="classify")
    assert args.eval_strategy == "no" and not args.load_best_model_at_end
    args = training_args(_cfg(max_steps=50, keep="best"), has_eval=True, shape="classify")
    assert args.eval_strategy == "steps" and args.eval_steps == 10 and args.load_best_model_at_end
    args = training_args(_cfg(max_steps=50, eval_steps=25), has_eval=True, shape="classify")
    assert args.eval_strategy == "steps" and args.eval_steps == 25 and not args.load_best_model_at_end


def test_train_says_what_it_evaluates_and_which_weights_it_kept(tmp_path):
    from peftmerge.cli.main import main

    bert = make_bert(tmp_path / "bert")
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(16))
    val = write_jsonl(tmp_path / "val.jsonl", sentiment_rows(100, seed=3))
    r = CliRunner().invoke(main, ["train", "--model", str(bert), "--data", str(data), "--validation", str(val),
                                  "--task", "sst", "-o", str(tmp_path / "o"), "--shape", "classify", "--r", "4",
                                  "--max-steps", "2", "--batch-size", "8", "--max-length", "16"])
    assert r.exit_code == 0, r.output
    assert "evaluation: after training on 32 of 100 validation rows" in r.stdout
    assert "kept the last step's weights (step 2)" in r.stdout
    meta = json.loads((tmp_path / "o" / "peftmerge.json").read_text())
    assert meta["kept"] == {"checkpoint": "last", "step": 2, "why": "the last step's weights (step 2)"}
    assert meta["evaluation"].startswith("evaluation: after training on 32 of 100 validation rows")
    assert "eval_accuracy" in meta["metrics"] and "eval_loss_before" not in meta["metrics"]


def test_train_help_shows_the_evaluation_schedule():
    from peftmerge.cli.main import main

    out = CliRunner().invoke(main, ["train", "--help"]).output
    assert "Evaluation: once after training" in out and "--keep [last|best]" in out
