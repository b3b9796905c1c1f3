"""Write a merged LoRA adapter folder that PEFT loads.

The config is written for the output (never copied from an input), as PEFT's ``LoraConfig`` reads it (without
importing peft, which would cost a merge its start-up time): ``r`` = the largest rank (what a serving
engine checks against its maximum), ``lora_alpha`` = r per module (scaling folded into the factors),
``rank_pattern`` / ``alpha_pattern`` for modules of another rank, ``target_modules`` = the union of the inputs'
modules as full paths, and ``bias`` / ``lora_bias`` as the bias tensors written (``lora_B.bias`` for merged
lora_bias updates; trained bias values under the keys PEFT saves them with).
Each input's task head (``modules_to_save``) is kept under its task name in ``heads/<task>.safetensors``;
the first input's head also sits in ``adapter_model.safetensors`` (PEFT loads no adapter without its
``modules_to_save`` tensors), and :func:`peftmerge.io.heads.load_head` switches to another task's head.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .adapter import PREFIX, LoraAdapter
from .base_model import common_base
from .card import write_card

HEADS_DIR = "heads"


def lora_keys(name: str, kind: str) -> tuple[str, str]:
    """The PEFT state-dict keys (adapter name stripped) of a module's A and B factors."""
    if kind == "embedding":
        return f"{PREFIX}{name}.lora_embedding_A", f"{PREFIX}{name}.lora_embedding_B"
    return f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"


def _common(values):
    values = [v for v in values if v is not None]
    return values[0] if values and all(v == values[0] for v in values) else None


def bias_key(tensor: str, lora_modules) -> str:
    """The PEFT state-dict key of a (trained) bias tensor: under ``base_layer`` when its module carries LoRA."""
    owner = tensor.removesuffix(".bias")
    return f"{PREFIX}{owner}.base_layer.bias" if owner in lora_modules else f"{PREFIX}{tensor}"


def lora_config(ranks: dict[str, int], *, base_model: str | None = None, task_type: str | None = None,
                fan_in_fan_out: bool = False, bias: str = "none", lora_bias: bool = False,
                modules_to_save: list[str] | None = None) -> dict:
    """PEFT's adapter_config.json of a LoRA adapter whose scaling is folded into its factors: ``r`` = the largest
    rank, ``lora_alpha`` = r (scaling 1), ``rank_pattern`` / ``alpha_pattern`` for the modules of another rank,
    ``target_modules`` = the modules as full paths. Fields left out take PEFT's defaults when it loads the file."""
    r = max(ranks.values())
    pattern = {re.escape(name): k for name, k in ranks.items() if k != r}
    return {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model, "inference_mode": True,
        "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks), "lora_dropout": 0.0, "fan_in_fan_out": fan_in_fan_out, "bias": bias,
        "lora_bias": lora_bias, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": modules_to_save or None,
    }


def adapter_config(ranks: dict[str, int], adapters: list[LoraAdapter], bias: str = "none",
                   lora_bias: bool = False) -> dict:
    """The merged adapter's config (:func:`lora_config`): task type, base model and ``fan_in_fan_out`` where the
    inputs agree, every input's head module under ``modules_to_save``."""
    heads = sorted({m for a in adapters if a.head_keys for m in (a.config.get("modules_to_save") or [])})
    return lora_config(ranks, base_model=common_base([(a.path, a.base_model) for a in adapters]),
                       task_type=_common([a.config.get("task_type") for a in adapters]),
                       fan_in_fan_out=bool(_common([a.config.get("fan_in_fan_out") for a in adapters])),
                       bias=bias, lora_bias=lora_bias, modules_to_save=heads)


def write_adapter(folder: Path, tensors: dict[str, tuple[str, torch.Tensor, torch.Tensor]],
                  adapters: list[LoraAdapter], report: dict, lora_biases: dict[str, torch.Tensor] | None = None,
                  biases: dict[str, torch.Tensor] | None = None) -> None:
    """``tensors``: {module: (kind, A, B)} with the scaling folded in (B @ A is the merged dW).
    ``lora_biases``: {module: merged bias change} (written as lora_B.bias; zeros for the other Linear modules,
    since PEFT gives every module one under lora_bias); ``biases``: {bias tensor: merged trained value}."""
    lora_biases, biases = lora_biases or {}, biases or {}
    state = {}
    for name, (kind, a, b) in tensors.items():
        ka, kb = lora_keys(name, kind)
        state[ka], state[kb] = a, b
        if lora_biases:
            bias = lora_biases.get(name)
            state[kb.removesuffix(".weight") + ".bias"] = (bias if bias is not None
                                                          else torch.zeros(b.shape[0], dtype=b.dtype)).contiguous()
    for name, value in biases.items():
        state[bias_key(name, tensors)] = value.contiguous()
    bias_mode = "none" if not biases else (
        "lora_only" if all(n.removesuffix(".bias") in tensors for n in biases) else "all")
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
    config = adapter_config(ranks, adapters, bias=bias_mode, lora_bias=bool(lora_biases))
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    meta = {"kind": "merged-adapter", "task": "+".join(a.task for a in adapters),
            "tasks": [a.task for a in adapters], "heads": heads, "default_head": default_head,
            "base_model": common_base([(a.path, a.base_model) for a in adapters])}
    (folder / "peftmerge.json").write_text(json.dumps(meta, indent=2))
    (folder / "merge_report.json").write_text(json.dumps(report, indent=2))
    recipe = {k: report[k] for k in ("method", "params", "weights", "rank", "dtype")}
    recipe["inputs"] = [{k: i[k] for k in ("task", "path", "sha256", "revision") if k in i} for i in report["inputs"]]
    write_card(folder, kind="merged-adapter", base_model=meta["base_model"], recipe=recipe,
               title=f"{report['method']} merge of {', '.join(meta['tasks'])}")
