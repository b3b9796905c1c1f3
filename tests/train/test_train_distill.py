"""Context distillation: without labels, base + LoRA without the prompt moves toward the base with it (KL falls)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from train_fixtures import make_tokenizer, sentiment_rows, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peftmerge  # noqa: E402
from peftmerge.cli.main import main  # noqa: E402
from peftmerge.train import TrainConfig, methods, train  # noqa: E402
from peftmerge.train.data import LABEL_TEMPLATE  # noqa: E402
from peftmerge.train.examples import Collator, text2text_example  # noqa: E402
from peftmerge.train.trainer import completion_logprobs  # noqa: E402

LABELS = ["negative", "positive"]
PROMPT = ("Answer positive if the text has good great fine nice happy love . Text : the movie was good Answer : "
          "positive . Text : bad film Answer : negative .")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny random Llama with large weights (initializer_range 0.2), so that the prompt changes its answers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("cd") / "llama"
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, pad_token_id=0,
                      bos_token_id=2, eos_token_id=3, initializer_range=0.2)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    make_tokenizer("causal").save_pretrained(folder)
    return folder


def _config(llama, tmp_path, data, **kw):
    (tmp_path / "prompt.txt").write_text(PROMPT)
    base = dict(model=str(llama), data=str(data), task="sst", out=str(tmp_path / "out"), method="context_distillation",
                teacher_prompt=str(tmp_path / "prompt.txt"), lr=1e-2, max_steps=10, batch_size=16, dropout=0.0,
                logging_steps=1, r=4, alpha=8, scheduler="constant", eval_before=True)
    return TrainConfig(**{**base, **kw})


def _label_distributions(model, tok, rows, template):
    """log q(label) per row, from the summed log-probs of each label word + EOS (the text2text scoring path)."""
    flat = [text2text_example({**r, "label": lab}, "labelled", tok, 256, False, template, "sst", LABELS)
            for r in rows for lab in LABELS]
    scores = completion_logprobs(model, Collator(tok.pad_token_id)(flat)).view(len(rows), len(LABELS))
    return torch.log_softmax(scores, dim=-1)


def _kl(log_p, log_q):
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def test_registered_and_mergeable():
    m = methods.get("context_distillation")
    assert m.mergeable and m.distill and m.causal_only and "2209.15189" in m.paper


@pytest.mark.parametrize("row", [{"instruction": "say hello", "output": "hello world"},
                                 {"instruction": "repeat", "input": "the movie", "output": "the movie"}])
def test_instruction_rows_get_the_training_prompt(row):
    from peftmerge.train.data import prompt_and_completion
    from peftmerge.train.distill import _prompt

    assert _prompt(row, "alpaca", None, "t", None) == prompt_and_completion(row, "alpaca")


def test_label_word_kl_to_the_prompted_teacher_falls(llama, tmp_path):
    rows = [{"text": r["text"]} for r in sentiment_rows(16, seed=1)]  # no labels
    val = write_jsonl(tmp_path / "v.jsonl", [{"text": r["text"]} for r in sentiment_rows(8, seed=9)])
    r = train(_config(llama, tmp_path, write_jsonl(tmp_path / "u.jsonl", rows), labels=LABELS, validation=str(val)))
    losses = [h["loss"] for h in r.history if "loss" in h]
    assert len(losses) == 10 and losses[-1] < 0.2 * losses[0], losses
    m = r.metrics  # eval_loss: the KL on held-out rows; no eval_accuracy without labels
    assert m["eval_loss"] < 0.5 * m["eval_loss_before"] and "eval_accuracy" not in m, m

    # Independently of the training loss: score each label word + EOS after the prompted / bare template.
    model, tok = r.model, r.tokenizer
    with torch.no_grad(), model.disable_adapter():
        teacher = _label_distributions(model, tok, rows, PROMPT + "\n\n" + LABEL_TEMPLATE)
        before = _label_distributions(model, tok, rows, LABEL_TEMPLATE)  # the student at init: B = 0, the base
    after = _label_distributions(model, tok, rows, LABEL_TEMPLATE)
    assert _kl(teacher, after) < 0.2 * _kl(teacher, before), (_kl(teacher, before), _kl(teacher, after))
    assert _kl(teacher, before) > 0.05  # the prompt does change the base's answers

    meta = json.loads((tmp_path / "out" / "peftmerge.json").read_text())
    assert meta["method"] == "context_distillation" and meta["mergeable"] is True and meta["labels"] == LABELS
    assert meta["config"]["teacher_prompt"].endswith("prompt.txt")
    report = peftmerge.combine([tmp_path / "out"], tmp_path / "merged", "task_arithmetic")  # merges like lora
    assert report["modules"] > 0


def test_prompt_only_rows_distil_the_teachers_own_answers(llama, tmp_path):
    """No completions: the teacher writes them (greedy), then the token-level KL falls."""
    rows = [{"prompt": r["text"]} for r in sentiment_rows(8, seed=2)]
    r = train(_config(llama, tmp_path, write_jsonl(tmp_path / "p.jsonl", rows), batch_size=8, max_length=40))
    losses = [h["loss"] for h in r.history if "loss" in h]
    assert losses[-1] < 0.8 * losses[0], losses


def test_cli_trains_and_errors_in_one_line(llama, tmp_path):
    rows = write_jsonl(tmp_path / "u.jsonl", [{"text": r["text"]} for r in sentiment_rows(8, seed=3)])
    (tmp_path / "p.txt").write_text(PROMPT)
    args = ["train", "--model", llama, "--data", rows, "--task", "sst", "--method", "context_distillation",
            "--max-steps", 2, "--batch-size", 8, "--r", 4]
    r = CliRunner().invoke(main, [str(a) for a in [*args, "-o", tmp_path / "ok", "--teacher-prompt", tmp_path / "p.txt",
                                                   "--labels", "negative,positive"]])
    assert r.exit_code == 0, r.output
    assert "sst: wrote" in r.output and "(context_distillation, text2text;" in r.output
    for extra, message in [([], "needs --teacher-prompt FILE"),
                           (["--teacher-prompt", tmp_path / "p.txt"], "pass --labels a,b"),
                           (["--teacher-prompt", tmp_path / "nope.txt"], "--teacher-prompt")]:
        r = CliRunner().invoke(main, [str(a) for a in [*args, "-o", tmp_path / "bad", *extra]])
        assert r.exit_code == 2 and message in r.output and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "bad").exists()
