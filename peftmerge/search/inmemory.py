"""Merge in memory and patch a loaded model, so each search candidate costs no disk round trip.

For each module, the inputs' task vectors are stacked once (cached when they fit ``cache_bytes``); a
candidate's merged dW is what :func:`peftmerge.merge.execute.lora` writes for it in
:func:`peftmerge.merge.combine.combine` (the same seeds, the same refactorization), so the model evaluated is the
adapter ``combine`` would write. Patching sets W = W0 + dW on the base model's weights in place.
"""

from __future__ import annotations

import torch

from ..errors import PeftmergeError
from ..io.adapter import LoraAdapter
from ..merge import execute, registry
from ..merge.plan import ModulePlan, stacked_deltas


class InMemoryMerge:
    """The merged dW of every module for given method params and per-input weights."""

    def __init__(self, adapters: list[LoraAdapter], plans: list[ModulePlan], method: registry.Method,
                 rank: int | None = None, cache_bytes: int = 2 << 30, grams=None):
        self.adapters, self.plans, self.method, self.rank = adapters, plans, method, rank
        self.grams, self.tasks = grams, [a.task for a in adapters]  # grams: a peftmerge.analysis.grams.Grams (regmean)
        need = sum(len(adapters) * p.shape[0] * p.shape[1] * 4 for p in plans)
        self._cache = {p.name: stacked_deltas(adapters, p) for p in plans} if need <= cache_bytes else None

    def deltas(self, plan: ModulePlan) -> torch.Tensor:
        return self._cache[plan.name] if self._cache is not None else stacked_deltas(self.adapters, plan)

    def context(self, plan: ModulePlan, generator=None, thresholds=None) -> registry.Context:
        grams = self.grams.of(plan.name, self.tasks) if self.grams is not None else None
        return registry.Context(plan.name, generator, thresholds, grams=grams)

    def shares(self, plan: ModulePlan, params: dict) -> torch.Tensor:
        """(n, *shape) what a layer-wise search weighs per input: dW_i, or the method's ``components``."""
        d = self.deltas(plan).float()
        m = self.method
        return d if m.components is None else m.components(d, m.resolve(params, len(self.adapters)),
                                                            self.context(plan))

    def merged(self, params: dict, weights) -> dict[str, torch.Tensor]:
        """{module: dense merged dW} as ``combine`` would write it (rank-r refactorized when not linear)."""
        m, n = self.method, len(self.adapters)
        params = m.resolve(params, n)
        w = torch.as_tensor(list(weights), dtype=torch.float32)
        thresholds = execute.global_thresholds(params, n, lambda: (self.deltas(p) for p in self.plans))
        out = {}
        for plan in self.plans:
            grams = self.grams.of(plan.name, self.tasks) if self.grams is not None else None
            ctx = execute.context(params, plan.name, thresholds, grams)
            cached = self._cache[plan.name] if self._cache is not None else None
            out[plan.name] = execute.lora_delta(m, self.adapters, plan, w, params, self.rank, ctx, cached)
        return out

    def single(self, i: int) -> dict[str, torch.Tensor]:
        """Input ``i``'s own task vectors (the individual adapter)."""
        return {p.name: self.deltas(p)[i] for p in self.plans}


class Patcher:
    """W = W0 + dW on a loaded (non-PEFT) model; W0 kept for the targeted modules only.

    Where the model ties its input embedding to its output layer (``tie_word_embeddings``) and either is patched,
    they are untied first: PEFT applies an embedding LoRA in the embedding only and an output-layer LoRA in the
    output layer only (a tied adapter adapts both, as two modules), and so does the patched model."""

    def __init__(self, model, plans: list[ModulePlan], fan_in_fan_out: bool = False):
        self.model, self.targets = model, {}
        _untie_patched_embeddings(model, plans)
        for plan in plans:
            try:
                module = model.get_submodule(plan.name)
            except AttributeError:
                raise PeftmergeError(f"module {plan.name} of the adapters is not in the model; search on the base "
                                     "model the adapters were trained on (--model)") from None
            transpose = plan.kind == "embedding" or fan_in_fan_out
            weight = module.weight
            want = (plan.shape[1], plan.shape[0]) if transpose else plan.shape
            if tuple(weight.shape) != tuple(want):
                raise PeftmergeError(f"module {plan.name}: weight {list(weight.shape)} does not fit the adapters' "
                                     f"update {list(plan.shape)}; use the base model they were trained on")
            self.targets[plan.name] = (weight, weight.detach().clone(), transpose)

    @torch.no_grad()
    def apply(self, deltas: dict[str, torch.Tensor]) -> None:
        for name, (weight, w0, transpose) in self.targets.items():
            d = deltas.get(name)
            if d is None:
                weight.copy_(w0)
            else:
                weight.copy_(w0 + (d.T if transpose else d).to(w0.dtype))


def _untie_patched_embeddings(model, plans: list[ModulePlan]) -> None:
    """Give the output layer its own copy of W0 where it shares its weight with the input embedding and either
    is patched."""
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if inp is None or out is None or out.weight is not inp.weight:
        return
    if not any(model.get_submodule(plan.name) in (inp, out) for plan in plans if _has(model, plan.name)):
        return
    out.weight = torch.nn.Parameter(inp.weight.detach().clone(), requires_grad=inp.weight.requires_grad)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False  # so nothing ties them again


def _has(model, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
