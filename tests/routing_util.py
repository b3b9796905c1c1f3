"""Tiny offline setup for the routing tests: a saved tiny Llama with a word-level tokenizer, and task
adapters on it with ``peftmerge.json`` files over synthetic, clearly separable tasks."""

from __future__ import annotations

import json
import random

from conftest import make_adapter, tiny_llama

TASKS = {
    "animals": "cat dog horse cow sheep goat".split(),
    "colors": "red blue green yellow purple orange".split(),
    "numbers": "one two three four five six".split(),
}
FILLER = "the a is and of to".split()
SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


def sentences(task: str, n: int, seed: int) -> list[str]:
    rng = random.Random(f"{task}-{seed}")
    words = TASKS[task]
    return [" ".join(rng.choice(words) if rng.random() < 0.9 else rng.choice(FILLER)
                     for _ in range(rng.randint(6, 10))) for _ in range(n)]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + FILLER + [w for ws in TASKS.values() for w in ws])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]")


def save_base(folder, cls=None, **kw):
    """The tiny Llama (seed 0, the one make_adapter uses) and its tokenizer, saved to ``folder``."""
    model = tiny_llama(0, cls=cls, **kw)
    model.config.pad_token_id = 0
    model.save_pretrained(str(folder))
    tokenizer().save_pretrained(str(folder))
    return folder


def task_adapter(folder, task: str, base, seed: int, shape="text2text", labels=None, samples=8, **kw):
    """A random LoRA adapter on the saved tiny base with a peftmerge.json for ``task``."""
    make_adapter(folder, seed=seed, base_name=str(base), **kw)
    meta = {"task": task, "shape": shape, "labels": labels, "template": None, "base_model": str(base),
            "samples": sentences(task, samples, seed=0) if samples else []}
    (folder / "peftmerge.json").write_text(json.dumps(meta))
    return folder


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
