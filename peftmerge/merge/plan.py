"""Open and check the inputs of a merge, and list the modules to merge.

Everything that can be wrong with the inputs is found here, before any output is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import PeftmergeError
from ..io.adapter import LoraAdapter, load_adapter
from ..io.base_model import check_same_base
from ..io.hub import resolve


@dataclass
class ModulePlan:
    """One module of the output: its shape and which inputs adapt it."""

    name: str
    kind: str  # linear | embedding
    shape: tuple[int, int]
    present: list[int]  # indices of the inputs that adapt this module
    transposed: bool = False  # the weight stores dW^T: embeddings and fan_in_fan_out (Conv1D) layers

    def ranks(self, adapters: list[LoraAdapter]) -> list[int]:
        return [adapters[i].modules[self.name].rank for i in self.present]


def stacked_deltas(adapters: list[LoraAdapter], plan: ModulePlan) -> torch.Tensor:
    """(n, d_out, d_in): each input's dW of this module, zeros where an input does not adapt it."""
    out = torch.zeros(len(adapters), *plan.shape)
    for i in plan.present:
        out[i] = adapters[i].delta(plan.name)
    return out


def open_inputs(paths: list[str | Path], alpha: float | None = None, force: bool = False,
                merges_biases: bool = False) -> list[LoraAdapter]:
    """Load every input (local path or Hub id) and check they were trained on the same base model.
    ``merges_biases``: the caller merges the inputs' bias changes (see :func:`load_adapter`)."""
    if not paths:
        raise PeftmergeError("no inputs; give one or more LoRA adapters (folders or .safetensors files)")
    adapters = []
    for p in paths:
        adapter = load_adapter(resolve(p, allow_patterns=["*.json", "*.safetensors", "heads/*"]), alpha=alpha,
                               merges_biases=merges_biases)
        adapter.ref = str(p)
        adapters.append(adapter)
    if alpha is not None and all(a.has_config for a in adapters):
        raise PeftmergeError(f"--alpha {alpha} is for inputs without an adapter_config.json, and every input has one "
                             "(its own lora_alpha is used); drop --alpha")
    check_same_base([(a.path, a.base_model) for a in adapters], force)
    _dedupe_tasks(adapters)
    return adapters


def _dedupe_tasks(adapters: list[LoraAdapter]) -> None:
    seen: dict[str, int] = {}
    for a in adapters:
        if a.task in seen:
            seen[a.task] += 1
            a.task = f"{a.task}-{seen[a.task]}"
        else:
            seen[a.task] = 1


def plan_modules(adapters: list[LoraAdapter], force: bool = False) -> list[ModulePlan]:
    """The union of the adapted modules (a module an input lacks has a zero task vector there)."""
    order: dict[str, ModulePlan] = {}
    for i, a in enumerate(adapters):
        for name, m in a.modules.items():
            p = order.get(name)
            if p is None:
                order[name] = ModulePlan(name, m.kind, m.shape, [i], m.transposed)
                continue
            if m.shape != p.shape or m.kind != p.kind:
                first = adapters[p.present[0]]
                raise PeftmergeError(
                    f"module {name}: {first.path} has a {p.kind} update of shape {list(p.shape)} but {a.path} has "
                    f"a {m.kind} one of shape {list(m.shape)}; these adapters were trained on different base models"
                )
            if m.transposed != p.transposed:
                first = adapters[p.present[0]]
                raise PeftmergeError(f"module {name}: {first.path} and {a.path} disagree on fan_in_fan_out; "
                                     "these adapters were trained on different base models")
            p.present.append(i)
    if len(adapters) > 1 and not force:
        common = set.intersection(*(set(a.modules) for a in adapters))
        if not common:
            raise PeftmergeError(
                f"{adapters[0].path} and the other inputs adapt no module in common; they are probably for different "
                "base models (pass --force to merge them anyway)"
            )
    return list(order.values())
