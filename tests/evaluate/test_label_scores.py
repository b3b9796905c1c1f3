"""label_scores: log p(label word | prompt) per row and label, against one unbatched forward pass per
(row, label); one-token label words (scored from one pass per row) and soft prompts (PEFT prompt tuning puts
its virtual tokens before the input, so the logits are longer than the ids)."""

from __future__ import annotations

import pytest
import torch

from eval_fixtures import SENTIMENT, save_llama, tokenizer
from peftmerge.data.predict import label_scores
from peftmerge.data.prompts import with_demos
from peftmerge.data.tasks import Task

TEMPLATE = "Review: {text}\nVerdict:"


def _reference(model, tok, task, demos=()):
    """Sum of log p over each label word's tokens, read from the tail of the logits of prompt + word."""
    out = torch.empty(len(task.rows), len(task.labels))
    with torch.no_grad():
        for i, row in enumerate(task.rows):
            p = tok(with_demos(task, row, list(demos)))["input_ids"]
            for k, label in enumerate(task.labels):
                c = tok(" " + label, add_special_tokens=False)["input_ids"]
                logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0, -len(c) - 1:-1], -1)
                out[i, k] = logp.gather(-1, torch.tensor(c)[:, None]).sum()
    return out


def _task(labels):
    rows = [dict(r, label=labels[r["label"] == "positive"]) for r in SENTIMENT]
    return Task("sent", None, rows, labels, TEMPLATE, {})


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(save_llama(tmp_path_factory.mktemp("llama"), seed=4)).eval()


@pytest.mark.parametrize("labels", [["negative", "positive"], ["bad", "very good"]], ids=["one-token", "two-token"])
@pytest.mark.parametrize("soft_prompt", [False, True], ids=["base", "prompt-tuning"])
def test_label_scores_match_unbatched_reference(llama, labels, soft_prompt):
    from peft import PromptTuningConfig, get_peft_model

    tok = tokenizer("llama")
    model = llama
    if soft_prompt:
        torch.manual_seed(0)
        model = get_peft_model(llama, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    task = _task(labels)
    demos = task.rows[:2]
    for shots in ((), demos):
        got = label_scores(model, tok, task, shots, batch_size=3, progress=False)
        torch.testing.assert_close(got, _reference(model, tok, task, shots), rtol=0, atol=1e-4)
