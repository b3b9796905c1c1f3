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
from .tasks import Task
from .prompts import answer_of, with_demos


def _batches(items, size):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _bar(total, desc, progress):
    return tqdm(total=total, desc=desc, unit="row", disable=not progress, leave=False)


def encode_rows(tokenizer, rows: list[dict], max_length: int):
    """A classifier's batch: ``text`` (and ``text_pair`` as the second segment), padded and truncated."""
    texts = [str(r["text"]) for r in rows]
    pairs = [str(r.get("text_pair", "")) for r in rows] if "text_pair" in rows[0] else None
    return tokenizer(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def prompt_and_answer(tokenizer, prompt: str, answer: str, max_length: int,
                      answer_limit: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` (truncated from the left: its end matters most) and of the answer after it (its
    first ``answer_limit`` tokens when given)."""
    p = _ids(tokenizer, prompt, True)
    c = _ids(tokenizer, answer_of(prompt, answer), False)[:answer_limit]
    return p[-max(1, max_length - len(c)):], c


def right_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of right-padded sequences: positions of real tokens are unchanged."""
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for j, x in enumerate(seqs):
        ids[j, :len(x)] = torch.tensor(x)
        mask[j, :len(x)] = 1
    return ids, mask


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


@torch.no_grad()
def predict_head(model, tokenizer, task: Task, *, batch_size=16, max_length=256, progress=True) -> list[str]:
    out: list[str] = []
    with _bar(len(task.rows), f"{task.name} (head)", progress) as bar:
        for rows in _batches(task.rows, batch_size):
            logits = model(**encode_rows(tokenizer, rows, max_length)).logits  # (B, num_labels)
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
    pad = pad_id(tokenizer)
    pairs = []  # per row, per label: (prompt ids, label word ids)
    for row in task.rows:
        prompt = with_demos(task, row, list(demos))
        pairs.append([prompt_and_answer(tokenizer, prompt, label, max_length) for label in task.labels])
    if all(len(c) == 1 for row in pairs for _, c in row):
        return _one_token_scores(model, pairs, pad, batch_size * len(task.labels), f"{task.name} (label words)",
                                 progress)
    seqs, spans = [], []  # one sequence per (row, label); span = (start, end) of the label's tokens
    for row in pairs:
        for pp, c in row:
            seqs.append(pp + c)
            spans.append((len(pp), len(pp) + len(c)))
    scores = torch.empty(len(seqs))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # similar lengths together: less padding
    with _bar(len(task.rows), f"{task.name} (label words)", progress) as bar:
        for idx in _batches(order, batch_size * len(task.labels)):
            ids, mask = right_pad([seqs[i] for i in idx], pad)
            logits = model(input_ids=ids, attention_mask=mask).logits
            off = logits.shape[1] - ids.shape[1]  # soft-prompt positions PEFT's prompt tuning puts first
            logp = torch.log_softmax(logits.float(), dim=-1)
            for j, i in enumerate(idx):
                s, e = spans[i]
                targets = ids[j, s:e]
                scores[i] = logp[j, off + s - 1:off + e - 1].gather(-1, targets[:, None]).sum()
            bar.update(len(idx) / len(task.labels))
    return scores.reshape(len(task.rows), len(task.labels))


def _one_token_scores(model, pairs, pad: int, batch: int, desc: str, progress: bool) -> torch.Tensor:
    """:func:`label_scores` when every label word is one token: one forward pass per row instead of one per
    (row, label), reading each label's log-probability at the prompt's last position (the same numbers)."""
    prompts = [row[0][0] for row in pairs]  # one token each: the prompt is cut the same way for every label
    words = [[c[0] for _, c in row] for row in pairs]
    scores = torch.empty(len(pairs), len(words[0]))
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    with _bar(len(pairs), desc, progress) as bar:
        for idx in _batches(order, batch):
            ids, mask = right_pad([prompts[i] for i in idx], pad)
            logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
            off = logits.shape[1] - ids.shape[1]  # soft-prompt positions PEFT's prompt tuning puts first
            last = torch.tensor([off + len(prompts[i]) - 1 for i in idx])
            logp = torch.log_softmax(logits[torch.arange(len(idx)), last].float(), dim=-1)  # (B, V)
            for j, i in enumerate(idx):
                scores[i] = logp[j, words[i]]
            bar.update(len(idx))
    return scores


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
