"""Arrow: data-free, per-token, per-layer routing among LoRA experts.

Ostapenko et al. 2024, "Towards Modular LLMs by Building and Reusing a Library of LoRAs"
(arXiv:2405.11157), Sec. 4; as implemented by PEFT (``ArrowConfig``, ``create_arrow_model``).

At each adapted layer, expert i's prototype v_i is the top right singular vector of its update
dW_i = B_i A_i. We compute it exactly in factor space: B = Q R (QR, Q orthonormal) so dW = Q (R A) and
the right singular vectors of dW are those of the small (r, d_in) matrix R A (one SVD). A token x
(the layer's input) is routed by

    logits_i = |x . v_i|   (sign-free, v_i is defined up to sign)
    keep the top-k, p = softmax(logits_topk / T),   y = W x + sum_{i in top-k} p_i s_i B_i A_i x

Optional GenKnowSub (Bagherifard et al. 2025, ACL short, "GenKnowSub"): before routing, subtract the mean
of general adapters' factors from every task adapter (A_i - mean_g A_g, B_i - mean_g B_g, as PEFT does;
requires equal ranks). Parameters: ``top_k`` (paper and PEFT: 3), ``temperature`` (PEFT: 1.0).
"""

from __future__ import annotations

import torch

from ..errors import PeftmergeError
from .registry import TEMPERATURE, TOP_K, BuildContext, register


def top_right_singular_vector(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Top right singular vector of ``b @ a`` (a: (r, d_in), b: (d_out, r)) without forming it.

    The sign is fixed so that the largest-magnitude entry is positive (prototypes are sign-free anyway).
    """
    q, r = torch.linalg.qr(b.double())  # b = q r
    _, _, vh = torch.linalg.svd(r @ a.double(), full_matrices=False)
    v = vh[0]
    return (v * torch.sign(v[v.abs().argmax()])).float()


def genknowsub(factors: list[tuple[torch.Tensor, torch.Tensor]],
               general: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Subtract the mean general factors from each task's ``(A, B)`` (GenKnowSub, PEFT's convention)."""
    if not general:
        return factors
    mean_a = torch.stack([a for a, _ in general]).mean(0)
    mean_b = torch.stack([b for _, b in general]).mean(0)
    out = []
    for a, b in factors:
        if a.shape != mean_a.shape or b.shape != mean_b.shape:
            raise PeftmergeError(f"GenKnowSub needs task and general adapters of the same rank and shapes; got "
                                 f"A {list(a.shape)} vs general {list(mean_a.shape)}; retrain them at one rank")
        out.append((a - mean_a, b - mean_b))
    return out


def arrow_weights(x: torch.Tensor, prototypes: torch.Tensor, top_k: int, temperature: float):
    """Tokens ``x`` (t, d_in), prototypes (E, d_in) -> (weights (t, k), expert indices (t, k))."""
    sim = (x @ prototypes.T).abs()  # (t, E)
    top, idx = sim.topk(min(int(top_k), prototypes.shape[0]), dim=1)
    return torch.softmax(top / temperature, dim=1), idx


def _general_factors(ctx: BuildContext, module: str):
    missing = [g.path for g in ctx.general if module not in g.modules]
    if missing:
        raise PeftmergeError(f"general adapter {missing[0]} does not adapt {module}; GenKnowSub needs general "
                             "adapters on the same modules as the task adapters")
    return [g.factors(module) for g in ctx.general]


@register("arrow", paper="https://arxiv.org/abs/2405.11157", params=(TOP_K(3), TEMPERATURE(1.0)), per_token=True)
def build_arrow(ctx: BuildContext, params: dict) -> dict[str, torch.Tensor]:
    """Per adapted Linear module: ``proto.<module>`` (E_m, d_in) and ``experts.<module>`` (E_m,) indices."""
    modules = sorted({m for a in ctx.adapters for m in a.modules})
    out = {}
    for module in modules:
        present = [i for i, a in enumerate(ctx.adapters) if module in a.modules]
        kinds = {ctx.adapters[i].modules[module].kind for i in present}
        if kinds != {"linear"}:
            raise PeftmergeError(f"{ctx.adapters[present[0]].path}: module {module} is an embedding LoRA; Arrow "
                                 "routes Linear layers only")
        factors = [ctx.adapters[i].factors(module) for i in present]
        if ctx.general:
            factors = genknowsub(factors, _general_factors(ctx, module))
        out[f"proto.{module}"] = torch.stack([top_right_singular_vector(a, b) for a, b in factors])
        out[f"experts.{module}"] = torch.tensor(present, dtype=torch.long)
    return out
