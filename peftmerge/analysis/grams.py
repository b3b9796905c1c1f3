"""``grams``: the Gram matrices of every adapted layer's inputs, per adapter on its own task's rows (for RegMean).

For input adapter i and every linear module of the merge plan, G_i = mean over tokens of
x x^T, where x is the module's input while the base model runs with adapter i (and its head) on rows of
task i, padding excluded. Classification adapters with a head read ``text`` (+ ``text_pair``); the others
read each row's prompt followed by its gold answer, as they were trained. Labels themselves are never used:
RegMean is data-aware, not supervised. The file (safetensors) holds one (d_in, d_in) float32 matrix per
task and module, named ``TASK/MODULE``, and records the token counts, the data files and each adapter's
sha256, so that a merge with a different adapter than the one measured is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..data.predict import encode_rows, pad_id, right_pad
from ..data.tasks import load_task, parse_pairs, read_meta, refuse_test_split
from ..errors import PeftmergeError
from ..io import atomic
from ..io.grams import FORMAT
from ..io.meta import file_sha256
from ..merge.plan import open_inputs, plan_modules
from ..search.layerwise import answer_sequences


def _batches(task, head: bool, tokenizer, batch_size: int, max_length: int):
    """(model kwargs, attention mask) per batch of the task's rows."""
    for s in range(0, len(task.rows), batch_size):
        rows = task.rows[s:s + batch_size]
        if head:
            enc = encode_rows(tokenizer, rows, max_length)
            yield dict(enc), enc["attention_mask"]
            continue
        seqs, _ = answer_sequences(tokenizer, task, rows, max_length)  # as the layer-wise search feeds them
        ids, mask = right_pad(seqs, pad_id(tokenizer))
        yield dict(input_ids=ids, attention_mask=mask), mask


class _Accumulator:
    """Forward pre-hooks summing x x^T (float64) of each module's inputs over the real tokens."""

    def __init__(self, model, names: list[str]):
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {n: 0 for n in names}
        self.mask: torch.Tensor | None = None
        self.handles = [model.get_submodule(n).register_forward_pre_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach()
            if self.mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(self.mask.shape):
                x = x[self.mask.bool()]  # real tokens only
            x = x.reshape(-1, x.shape[-1]).double()
            g = x.T @ x
            self.sums[name] = self.sums[name] + g if name in self.sums else g
            self.tokens[name] += x.shape[0]
        return hook

    def close(self) -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        return {n: (s / max(1, self.tokens[n])).float() for n, s in self.sums.items()}


def grams(inputs: Sequence[str | Path], out: str | Path, *, data, model: str | None = None, limit: int | None = 400,
          batch_size: int = 16, max_length: int = 256, alpha: float | None = None, force: bool = False,
          overwrite: bool = False, progress: bool = True) -> dict:
    """Measure each adapter's Gram matrices on its task's rows (``data``: {task: file} or NAME=FILE strings,
    validation or train splits; a test split is refused) and write them to ``out`` (.safetensors)."""
    from ..io.heads import load_plain_head
    from ..search.search import Evaluator

    out = Path(out)
    if out.suffix != ".safetensors":
        raise PeftmergeError(f"output {out} must be a .safetensors file (e.g. -o grams.safetensors)")
    data = data if isinstance(data, dict) else parse_pairs(data, "--data")
    for path in data.values():
        refuse_test_split(path, "--data")
    for name, v in (("--limit", limit), ("--batch-size", batch_size), ("--max-length", max_length)):
        if v is not None and v < 1:
            raise PeftmergeError(f"{name} {v} must be >= 1")
    atomic.check_output(out, [Path(p) for p in (*inputs, *data.values(), model) if p], overwrite, folder=False)
    adapters = open_inputs(list(inputs), alpha=alpha, force=force)
    missing = [a.task for a in adapters if a.task not in data]
    if missing:
        raise PeftmergeError(f"no --data for task(s) {', '.join(missing)}; give each adapter's rows as "
                             f"TASK=FILE (e.g. --data {missing[0]}=path/validation.jsonl)")
    plans = plan_modules(adapters, force=force)
    base = model or next((a.base_model for a in adapters if a.base_model), None)
    if not base:
        raise PeftmergeError("the adapters do not name their base model; pass --model BASE")
    tasks = {a.task: load_task(a.task, data[a.task], limit=limit, meta=read_meta(a.path)) for a in adapters}
    ev = Evaluator(base, adapters, plans, list(tasks.values()), batch_size=batch_size, max_length=max_length,
                   max_new_tokens=1)
    names = [p.name for p in plans if p.kind == "linear"]  # an embedding's inputs are token ids
    if not names:
        raise PeftmergeError("the adapters adapt no linear layer; RegMean's Gram matrices are of linear layers' "
                             "inputs")
    tensors, tokens = {}, {}
    with tqdm(total=sum(len(t.rows) for t in tasks.values()), desc="grams", unit="row", disable=not progress) as bar, \
            torch.no_grad():
        for i, a in enumerate(adapters):
            task = tasks[a.task]
            key, head = ev.plan[a.task]
            net, patcher = ev.models[key]
            patcher.apply({p.name: a.delta(p.name) for p in plans if i in p.present})
            if head is not None:
                load_plain_head(net, head)
            acc = _Accumulator(net, names)
            try:
                for kwargs, mask in _batches(task, head is not None, ev.tokenizer, batch_size, max_length):
                    acc.mask = mask
                    net(**kwargs)
                    bar.update(len(mask))
            finally:
                result = acc.close()
            for name in names:
                if name not in result:
                    raise PeftmergeError(f"module {name} never ran on task {a.task}'s rows; is it part of the "
                                         "forward pass of this model kind?")
                tensors[f"{a.task}/{name}"] = result[name].contiguous()
            tokens[a.task] = acc.tokens[names[0]]
    report = {"format": FORMAT, "base_model": base, "tasks": [a.task for a in adapters], "tokens": tokens,
              "data": {a.task: {"path": str(data[a.task]), "rows": len(tasks[a.task].rows)} for a in adapters},
              "sha256": {a.task: file_sha256(a.file.path) for a in adapters}, "modules": len(names)}
    with atomic.atomic_file(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata={"peftmerge": json.dumps(report)})
    return report
