"""Write a merged LoRA adapter folder that PEFT loads.

The config is written for the output (never copied from an input): its own ``r`` and ``lora_alpha``
(scaling folded into the factors, so alpha = r per module), ``rank_pattern`` / ``alpha_pattern`` for
modules of another rank, and ``target_modules`` = the union of the inputs' modules as full paths.
Each input's task head (``modules_to_save``) is kept under its task name in ``heads/<task>.safetensors``;
the first input's head also sits in ``adapter_model.safetensors`` (PEFT loads no adapter without its
``modules_to_save`` tensors), and :func:`peftmerge.io.heads.load_head` switches to another task's head.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from ..card import write_card
from .adapter import PREFIX, LoraAdapter
from .base_model import common_base

HEADS_DIR = "heads"


def lora_keys(name: str, kind: str) -> tuple[str, str]:
    """The PEFT state-dict keys (adapter name stripped) of a module's A and B factors."""
    if kind == "embedding":
        return f"{PREFIX}{name}.lora_embedding_A", f"{PREFIX}{name}.lora_embedding_B"
    return f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"


def _common(values):
    values = [v for v in values if v is not None]
    return values[0] if values and all(v == values[0] for v in values) else None


def adapter_config(ranks: dict[str, int], adapters: list[LoraAdapter]) -> dict:
    """The output's adapter_config.json (through peft's LoraConfig, so it matches the installed peft)."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(name): k for name, k in ranks.items() if k != r}
    heads = sorted({m for a in adapters if a.head_keys for m in (a.config.get("modules_to_save") or [])})
    config = LoraConfig(
        r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern), target_modules=sorted(ranks),
        lora_dropout=0.0, bias="none", use_rslora=False,
        fan_in_fan_out=bool(_common([a.config.get("fan_in_fan_out") for a in adapters])),
        modules_to_save=heads or None,
        task_type=_common([a.config.get("task_type") for a in adapters]),
        base_model_name_or_path=common_base([(a.path, a.base_model) for a in adapters]),
        inference_mode=True,
    )
    d = config.to_dict()
    d["target_modules"] = sorted(ranks)
    return json.loads(json.dumps(d, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


def write_adapter(folder: Path, tensors: dict[str, tuple[str, torch.Tensor, torch.Tensor]],
                  adapters: list[LoraAdapter], report: dict) -> None:
    """``tensors``: {module: (kind, A, B)} with the scaling folded in (B @ A is the merged dW)."""
    state = {}
    for name, (kind, a, b) in tensors.items():
        ka, kb = lora_keys(name, kind)
        state[ka], state[kb] = a, b
    heads, default_head = {}, None
    for a in adapters:
        if a.head_keys:
            (folder / HEADS_DIR).mkdir(exist_ok=True)
            heads[a.task] = f"{HEADS_DIR}/{a.task}.safetensors"
            head = {k: v.contiguous() for k, v in a.heads().items()}
            save_file(head, str(folder / heads[a.task]))
            if default_head is None:  # PEFT needs one head in the adapter file to load it at all
                default_head = a.task
                state.update(head)
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    ranks = {name: a.shape[0] for name, (_, a, _) in tensors.items()}
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config(ranks, adapters), indent=2))
    meta = {"kind": "merged-adapter", "task": "+".join(a.task for a in adapters),
            "tasks": [a.task for a in adapters], "heads": heads, "default_head": default_head,
            "base_model": common_base([(a.path, a.base_model) for a in adapters])}
    (folder / "peftmerge.json").write_text(json.dumps(meta, indent=2))
    (folder / "merge_report.json").write_text(json.dumps(report, indent=2))
    recipe = {k: report[k] for k in ("method", "params", "weights", "rank", "dtype")}
    recipe["inputs"] = [{k: i[k] for k in ("task", "path", "sha256", "revision") if k in i} for i in report["inputs"]]
    write_card(folder, kind="merged-adapter", base_model=meta["base_model"], recipe=recipe,
               title=f"{report['method']} merge of {', '.join(meta['tasks'])}")
