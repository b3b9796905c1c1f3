"""Batched, deterministic predictions of one model on one task.

- ``head``: a sequence-classification head; the prediction is ``labels[argmax logits]``.
- ``label_words``: a causal LM scores each label word after the prompt, log p(word | prompt) summed over
  the word's tokens, and the best scoring word is the prediction (constrained scoring, as lm-eval-harness
  does for multiple choice).
- ``generate``: greedy decoding after the prompt (instruction rows).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..errors import PeftmergeError
from .data import Task
from .prompts import answer_of, with_demos


def _batches(items, size):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _bar(total, desc, progress):
    return tqdm(total=total, desc=desc, unit="row", disable=not progress, leave=False)


@torch.no_grad()
def predict_head(model, tokenizer, task: Task, *, batch_size=16, max_length=256, progress=True) -> list[str]:
    out: list[str] = []
    with _bar(len(task.rows), f"{task.name} (head)", progress) as bar:
        for rows in _batches(task.rows, batch_size):
            texts = [str(r["text"]) for r in rows]
            pairs = [str(r.get("text_pair", "")) for r in rows] if "text_pair" in rows[0] else None
            enc = tokenizer(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            logits = model(**enc).logits  # (B, num_labels)
            if logits.shape[-1] != len(task.labels):
                raise PeftmergeError(f"task {task.name}: the head has {logits.shape[-1]} outputs but the task has "
                                     f"{len(task.labels)} labels {task.labels}; evaluate it with its own head")
            out += [task.labels[i] for i in logits.argmax(-1).tolist()]
            bar.update(len(rows))
    return out


def _ids(tokenizer, text, special):
    return tokenizer(text, add_special_tokens=special)["input_ids"]


@torch.no_grad()
def label_scores(model, tokenizer, task: Task, demos=(), *, batch_size=16, max_length=256,
                 progress=True) -> torch.Tensor:
    """(rows, labels) summed log-likelihoods of each label word after each row's prompt."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    seqs, spans = [], []  # one sequence per (row, label); span = (start, end) of the label's tokens
    for row in task.rows:
        prompt = with_demos(task, row, list(demos))
        p = _ids(tokenizer, prompt, True)
        for label in task.labels:
            c = _ids(tokenizer, answer_of(prompt, label), False)
            keep = max(1, max_length - len(c))
            pp = p[-keep:]  # truncate the prompt from the left: the end of the prompt matters most
            seqs.append(pp + c)
            spans.append((len(pp), len(pp) + len(c)))
    scores = torch.empty(len(seqs))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # similar lengths together: less padding
    with _bar(len(task.rows), f"{task.name} (label words)", progress) as bar:
        for idx in _batches(order, batch_size * len(task.labels)):
            width = max(len(seqs[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for j, i in enumerate(idx):  # right padding: positions of real tokens are unchanged
                ids[j, :len(seqs[i])] = torch.tensor(seqs[i])
                mask[j, :len(seqs[i])] = 1
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            for j, i in enumerate(idx):
                s, e = spans[i]
                targets = ids[j, s:e]
                scores[i] = logp[j, s - 1:e - 1].gather(-1, targets[:, None]).sum()
            bar.update(len(idx) / len(task.labels))
    return scores.reshape(len(task.rows), len(task.labels))


def predict_label_words(model, tokenizer, task: Task, demos=(), **kw) -> list[str]:
    scores = label_scores(model, tokenizer, task, demos, **kw)
    return [task.labels[i] for i in scores.argmax(-1).tolist()]


@torch.no_grad()
def predict_generate(model, tokenizer, task: Task, demos=(), *, batch_size=8, max_length=256, max_new_tokens=64,
                     progress=True) -> list[str]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side, trunc = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = "left"  # generation continues from the last real token
    tokenizer.truncation_side = "left"  # keep the end of a long prompt
    out: list[str] = []
    try:
        with _bar(len(task.rows), f"{task.name} (generate)", progress) as bar:
            for rows in _batches(task.rows, batch_size):
                prompts = [with_demos(task, r, list(demos)) for r in rows]
                enc = tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     pad_token_id=pad)
                new = gen[:, enc["input_ids"].shape[1]:]
                out += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
                bar.update(len(rows))
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, trunc
    return out
