"""Turn rows into token examples: completion-only labels (-100 on the prompt), truncation, packing, padding.

Text2text examples follow the usual instruction-tuning recipe (Alpaca, Taori et al. 2023; QLoRA,
Dettmers et al. 2023, sec. 4 "train on target"): the loss is computed only on the completion tokens, so
``labels`` is -100 on every prompt token unless ``train_on_inputs``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import prompt_and_completion

IGNORE = -100


def fit(prompt: list[int], completion: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut ``prompt + completion`` to ``max_length`` tokens.

    The completion keeps at least half of the budget (cut at its end); the prompt is cut in the middle so
    that both its instruction head and its answer cue (e.g. ``Answer:``) survive.
    """
    if len(prompt) + len(completion) <= max_length:
        return prompt, completion
    completion = completion[: max(max_length - len(prompt), max_length // 2, 1)]
    keep = max_length - len(completion)
    if len(prompt) > keep:
        head = keep // 2
        prompt = prompt[:head] + prompt[len(prompt) - (keep - head):] if keep > head else prompt[:head]
    return prompt, completion


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def text2text_example(row: dict, fmt: str, tokenizer, max_length: int, train_on_inputs: bool = False,
                      template: str | None = None, task: str = "", labels: list[str] | None = None) -> dict:
    """One causal-LM example ``{"input_ids", "attention_mask", "labels"}`` with the prompt masked."""
    if fmt == "chat":
        # The prompt is everything up to the assistant's last turn, rendered with the generation prompt.
        msgs = row["messages"]
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        head = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        n = _common_prefix(full_ids, head_ids)
        prompt, completion = full_ids[:n], full_ids[n:]
    else:
        p, c = prompt_and_completion(row, fmt, template, task, labels)
        prompt = tokenizer(p, add_special_tokens=True)["input_ids"]
        completion = tokenizer(c, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            completion = completion + [tokenizer.eos_token_id]
    prompt, completion = fit(prompt, completion, max_length)
    ids = prompt + completion
    lab = list(ids) if train_on_inputs else [IGNORE] * len(prompt) + completion
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": lab}


def classify_example(row: dict, tokenizer, label2id: dict[str, int], max_length: int) -> dict:
    """One sequence-classification example: ``text`` (+ ``text_pair``) tokenized, ``labels`` the class id."""
    enc = tokenizer(str(row["text"]), row.get("text_pair") or None, truncation=True, max_length=max_length)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": label2id[str(row["label"])]}


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Greedily concatenate whole examples into sequences of at most ``max_length`` tokens.

    Labels keep their masks; attention spans the packed examples (plain packing, as in the GPT-style
    pretraining recipe), which is cheap and fine for short supervised examples.
    """
    packed, cur = [], {"input_ids": [], "attention_mask": [], "labels": []}
    for ex in examples:
        if cur["input_ids"] and len(cur["input_ids"]) + len(ex["input_ids"]) > max_length:
            packed.append(cur)
            cur = {"input_ids": [], "attention_mask": [], "labels": []}
        for k in cur:
            cur[k] = cur[k] + list(ex[k])
    if cur["input_ids"]:
        packed.append(cur)
    return packed


@dataclass
class Collator:
    """Pad a batch: ``pad_id`` in ``input_ids``, 0 in ``attention_mask``, -100 in token ``labels``.

    Right padding, except ``left=True`` for decoder classifiers: they read the last position, which with
    soft prompts (``inputs_embeds``) they cannot locate by the pad token.
    """

    pad_id: int
    pad_to_multiple_of: int | None = None
    left: bool = False

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(ex["input_ids"]) for ex in batch)
        if self.pad_to_multiple_of:
            n = -(-n // self.pad_to_multiple_of) * self.pad_to_multiple_of
        out = {
            "input_ids": torch.full((len(batch), n), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(batch), n), dtype=torch.long),
        }
        token_labels = isinstance(batch[0]["labels"], list)
        out["labels"] = torch.full((len(batch), n), IGNORE, dtype=torch.long) if token_labels else torch.tensor(
            [ex["labels"] for ex in batch], dtype=torch.long
        )
        for i, ex in enumerate(batch):  # (B, T)
            k = len(ex["input_ids"])
            span = slice(n - k, n) if self.left else slice(0, k)
            out["input_ids"][i, span] = torch.tensor(ex["input_ids"])
            out["attention_mask"][i, span] = torch.tensor(ex["attention_mask"])
            if token_labels:
                out["labels"][i, span] = torch.tensor(ex["labels"])
        return out
