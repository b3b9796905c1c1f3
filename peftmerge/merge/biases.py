"""The bias changes of LoRA adapters, in a merge into an adapter (no base model at hand).

An adapter changes biases in two ways (:mod:`peftmerge.io.adapter`):

- ``lora_bias=True``: module m's bias changes by ``s * lora_B.bias``, a task vector like dW. The method merges
  the stacked vectors (zeros where an input has none) exactly as the ``--base`` path merges that bias tensor
  (same DARE seed, the tensor's name), and the output carries the result as its own ``lora_B.bias``.
- ``bias="all"`` / ``"lora_only"``: the trained biases b_i are saved as values, which PEFT loads over the base
  model's. Their task vectors b_i - b0 need the base's b0 (an input that did not train a bias leaves it at b0:
  a zero task vector). A linear merge is b0 + sum_{i in T} c_i (b_i - b0), T the inputs that trained it; it is
  free of b0, sum_{i in T} c_i b_i, exactly when sum_{i in T} c_i = 1. That case is merged and written as
  values; any other is refused (``--base`` merges them exactly, as task vectors, with any method).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import PeftmergeError
from . import registry

AFFINE_TOL = 1e-6  # |sum_i c_i - 1| below which sum_i c_i b_i is taken as b0 + sum_i c_i (b_i - b0)


def lora_bias_stack(adapters, plan) -> torch.Tensor | None:
    """(n, d_out): each input's bias task vector ``s * lora_B.bias`` of this module (zeros where it has none),
    or None when no input has one."""
    if not any(adapters[i].modules[plan.name].bias_key for i in plan.present):
        return None
    out = torch.zeros(len(adapters), plan.shape[0])
    for i in plan.present:
        d = adapters[i].bias_delta(plan.name)
        if d is not None:
            out[i] = d
    return out


def trained_biases(m: registry.Method, adapters, weights_of: Callable, params: dict) -> dict[str, torch.Tensor]:
    """{bias tensor: merged value} of the inputs' trained biases (``bias="all"``/``"lora_only"``), where that is
    exact without the base model; a one-line refusal otherwise. ``weights_of(module)``: that module's weights."""
    names = sorted({name for a in adapters for name in a.biases})
    if not names:
        return {}
    holder = next(a for a in adapters if a.biases)
    why = (f"{holder.path}: trained biases (bias={holder.config.get('bias')!r}, e.g. {names[0]}) are saved as values, "
           f"and merging them as task vectors b - b0 needs the base model's biases: pass --base BASE for a full "
           "merged model")
    if not m.linear:
        raise PeftmergeError(f"{why} ({m.name} is not a weighted sum)")
    out = {}
    for name in names:
        c = m.coefficients(weights_of(name.removesuffix(".bias")), params).double()
        trained = [(float(ci), a) for ci, a in zip(c, adapters) if name in a.biases]
        total = sum(ci for ci, _ in trained)
        if abs(total - 1.0) > AFFINE_TOL:
            raise PeftmergeError(f"{why} (or give the inputs that trained it weights whose coefficients sum to 1, "
                                 f"not {total:g})")
        out[name] = sum(ci * a.bias(name).double() for ci, a in trained).float()
    return out
