"""Layer-wise task-arithmetic coefficients learned by gradient descent on labelled validation rows.

AdaMerging (Yang et al., ICLR 2024, "AdaMerging: Adaptive Model Merging for Multi-Task Learning",
arXiv:2310.02575, Eq. 5 "layer-wise AdaMerging") merges every layer l as

    W_l = W0_l + sum_i lambda_{i,l} dW_{i,l}

and learns one coefficient per task vector and layer. The paper minimises the prediction entropy on
unlabelled test inputs; peftmerge minimises the cross-entropy on the labelled *validation* rows instead,
so the test split is never read: each task's loss goes through its own head (classification adapters) or
is the negative log-likelihood of the gold answer after the prompt (label words, instructions).

Groups (``by``): ``layer`` = one coefficient per input per transformer block (modules whose names share a
block index ``.<n>.``; a module outside the blocks, e.g. BERT's pooler, is its own group), or ``module``.
Everything here is a pure function of the model, the task vectors and the coefficients; the search loop
and the written merge are in :mod:`.search`.
"""

from __future__ import annotations

import random
import re

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..data.predict import encode_rows, pad_id, prompt_and_answer, right_pad
from ..data.prompts import prompt_of
from ..io.heads import load_plain_head

_BLOCK = re.compile(r"\.(\d+)\.")


def groups(modules: list[str], by: str) -> list[str]:
    """The group of each module: ``layer N`` (first ``.N.`` in its name; else the module itself) or the module."""
    if by == "module":
        return list(modules)
    out = []
    for name in modules:
        m = _BLOCK.search(name)
        out.append(f"layer {m.group(1)}" if m else name)
    return out


def short_name(group: str) -> str:
    """A plot label: ``layer 3``, or ``3 self.query`` for ``bert.encoder.layer.3.attention.self.query``."""
    if group.startswith("layer "):
        return group
    m = _BLOCK.search(group)
    tail = ".".join(group.split(".")[-2:])
    return f"{m.group(1)} {tail}" if m else tail


def merged_deltas(coefficients: torch.Tensor, deltas: dict[str, torch.Tensor], group_index: dict[str, int]):
    """{module: sum_i c[i, g(module)] dW_i} for coefficients c (inputs, groups)."""
    return {name: torch.tensordot(coefficients[:, group_index[name]], d, dims=1) for name, d in deltas.items()}


def patched_params(targets: dict, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``functional_call`` parameters W0 + dW of a :class:`.inmemory.Patcher`'s targets (autograd flows to dW)."""
    out = {}
    for name, (_, w0, transpose) in targets.items():
        d = deltas[name]
        out[f"{name}.weight"] = w0 + (d.T if transpose else d).to(w0.dtype)
    return out


def head_loss(model, tokenizer, task, rows, params, max_length: int) -> torch.Tensor:
    """Cross-entropy of a classification head's logits against the rows' labels."""
    enc = encode_rows(tokenizer, rows, max_length)
    logits = functional_call(model, params, args=(), kwargs=dict(enc)).logits
    y = torch.tensor([task.labels.index(str(r["label"])) for r in rows])
    return F.cross_entropy(logits.float(), y)


def answer_sequences(tokenizer, task, rows, max_length: int) -> tuple[list[list[int]], list[int]]:
    """Each row's prompt + gold answer (label word or output) token ids, and where its answer starts."""
    seqs, starts = [], []
    for row in rows:
        gold = str(row["label"] if task.kind == "classify" else row["output"])
        p, c = prompt_and_answer(tokenizer, prompt_of(task, row), gold, max_length, max(1, max_length // 2))
        seqs.append(p + c)
        starts.append(len(p))
    return seqs, starts


def answer_loss(model, tokenizer, task, rows, params, max_length: int) -> torch.Tensor:
    """Mean negative log-likelihood per gold answer token (label word or output) after each row's prompt,
    packed as :func:`peftmerge.data.predict.label_scores` packs a label word (an answer's first
    ``max_length // 2`` tokens at most)."""
    seqs, starts = answer_sequences(tokenizer, task, rows, max_length)
    ids, mask = right_pad(seqs, pad_id(tokenizer))
    labels = torch.full_like(ids, -100)
    for j, (s, start) in enumerate(zip(seqs, starts)):
        labels[j, start:len(s)] = ids[j, start:len(s)]
    logits = functional_call(model, params, args=(), kwargs=dict(input_ids=ids, attention_mask=mask)).logits
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def steps(tasks, batch_size: int, seed: int) -> list[list[tuple]]:
    """One epoch of steps; each step holds one batch of every task: [[(task, rows), ...], ...].

    Every task's rows are shuffled (seeded); the epoch lasts as many steps as the largest task has batches, and
    smaller tasks cycle through their rows again, so each step weighs every task equally (AdaMerging sums the
    tasks' losses at each step)."""
    rng = random.Random(seed)
    orders = {t.name: rng.sample(range(len(t.rows)), len(t.rows)) for t in tasks}
    n_steps = max(-(-len(t.rows) // batch_size) for t in tasks)
    cursor = {t.name: 0 for t in tasks}
    out = []
    for _ in range(n_steps):
        step = []
        for t in tasks:
            order, take = orders[t.name], min(batch_size, len(t.rows))
            step.append((t, [t.rows[order[(cursor[t.name] + j) % len(order)]] for j in range(take)]))
            cursor[t.name] += take
        out.append(step)
    return out


def epoch(evaluator, coefficients: torch.Tensor, deltas, group_index, optimizer, *, batch_size: int,
          max_length: int, seed: int) -> float:
    """One epoch of Adam steps on the mean over tasks of the task losses; returns the mean loss."""
    total = []
    for step in steps(evaluator.tasks, batch_size, seed):
        optimizer.zero_grad()
        losses = []
        for task, rows in step:
            key, head = evaluator.plan[task.name]
            model, patcher = evaluator.models[key]
            if head is not None:
                load_plain_head(model, head)
            params = patched_params(patcher.targets, merged_deltas(coefficients, deltas, group_index))
            loss = (head_loss if head is not None else answer_loss)(model, evaluator.tokenizer, task, rows, params,
                                                                   max_length) / len(step)
            loss.backward()  # per task: one task's graph in memory at a time
            losses.append(loss.item())
        optimizer.step()
        total.append(sum(losses))
    return sum(total) / max(1, len(total))
