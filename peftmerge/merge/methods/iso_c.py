"""Iso-C (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces", arXiv:2502.04959; official code danielm1405/iso-merging).

Per 2-D tensor, the task-arithmetic sum is made isotropic: its singular vectors are kept and every
singular value is replaced by their mean, so no direction of one task dominates the others::

    sum_i w_i dW_i = U S V^T,   dW = lambda * mean(S) * U V^T

Other tensors (biases, norms): the mean of the task vectors, as the official code does.

LoRA reading: the sum of n rank-r task vectors has rank <= n r; the mean and U V^T run over its nonzero
singular values (above 1e-6 of the largest). The paper's matrices are full rank, where this is exactly its
definition; over the zero ones the mean would shrink and U V^T would add arbitrary null-space directions.
LoRA inputs merge in factor space (the sum's SVD from its concatenated factors, rank <= sum r_i).
Defaults: lambda 1 (the paper tunes its alpha on validation data; see ``peftmerge search``).
"""

import torch

from ..lowrank import factor_svd
from ..registry import LAMBDA, register
from .tsv import nonzero_top


def _iso(u, s, vh, lam: float, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) = (lambda mean(S) U, V^T) over the nonzero singular values."""
    u, s, vh = nonzero_top(u, s, vh, s.numel())
    if not s.numel():
        return torch.zeros(shape[0], 1), torch.zeros(1, shape[1])
    return lam * s.mean() * u, vh


def iso_c_factored(factors: list, n: int, shape, params: dict, ctx=None):
    """Iso-C of LoRA inputs ``[(w_i s_i B_i, A_i) or None, ...]``: the sum B_cat A_cat's SVD from its factors."""
    factors = [f for f in factors if f is not None]
    b = torch.cat([b for b, _ in factors], dim=1)
    a = torch.cat([a for _, a in factors], dim=0)
    b, a = _iso(*factor_svd(b.double(), a.double()), params["lambda"], shape)
    return b.float(), a.float()


@register("iso_c", paper="https://arxiv.org/abs/2502.04959", params=(LAMBDA,), factored=iso_c_factored)
def iso_c(deltas, weights, params, ctx):
    total = torch.tensordot(weights.double(), deltas.double(), dims=1)
    if deltas.dim() != 3:
        return (params["lambda"] * total / deltas.shape[0]).to(deltas.dtype)
    b, a = _iso(*torch.linalg.svd(total, full_matrices=False), params["lambda"], total.shape)
    return (b @ a).to(deltas.dtype)
