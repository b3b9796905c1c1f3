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

Rank k below the sum's rank (``--rank``): every singular value of the Iso-C merge is the same, so its best
rank-k approximations are all equally good and an SVD would keep an arbitrary k of its directions. The paper's
subspace variant Iso-CTS (``iso_cts`` in the official code) keeps the top singular directions of the sum as its
common subspace and takes the isotropic value as the mean over the kept singular values; with no task-specific
part this is Iso-C of the sum's best rank-k approximation: lambda * mean(S_k) * U_k V_k^T (the report gives the
relative error against the full-rank Iso-C merge).
Defaults: lambda 1 (the paper tunes its alpha on validation data; see ``peftmerge search``).
"""

import torch

from ..registry import LAMBDA, register
from .lowrank import factor_svd, sum_of_factors
from .tsv import nonzero_top


def _iso(u, s, vh, lam: float, shape, rank: int | None = None):
    """(B, A, relative error) = (lambda mean(S_k) U_k, V_k^T, ...) over the top ``rank`` (default: all) nonzero
    singular values; the error is against the full-rank merge (0 when nothing is dropped)."""
    u, s, vh = nonzero_top(u, s, vh, s.numel())
    if not s.numel():
        return torch.zeros(shape[0], 1, dtype=u.dtype), torch.zeros(1, shape[1], dtype=u.dtype), 0.0
    r, k = s.numel(), min(rank or s.numel(), s.numel())
    full, kept = float(s.mean()), float(s[:k].mean())
    # ||full U V^T - kept U_k V_k^T||_F^2 = k (full - kept)^2 + (r - k) full^2, against r full^2
    err = ((k * (full - kept) ** 2 + (r - k) * full ** 2) / (r * full ** 2)) ** 0.5
    return lam * kept * u[:, :k], vh[:k], err


def iso_c_factored(factors: list, n: int, shape, params: dict, ctx=None):
    """Iso-C of LoRA inputs ``[(w_i s_i B_i, A_i) or None, ...]``: the sum B_cat A_cat's SVD from its factors,
    kept to its top ``ctx.rank`` directions; returns (B, A, relative error against the full-rank merge)."""
    factors = [f for f in factors if f is not None]
    b, a = sum_of_factors([b.double() for b, _ in factors], [a.double() for _, a in factors], shape)
    b, a, err = _iso(*factor_svd(b, a), params["lambda"], shape, getattr(ctx, "rank", None))
    return b.float(), a.float(), err


@register("iso_c", paper="https://arxiv.org/abs/2502.04959", params=(LAMBDA,), factored=iso_c_factored)
def iso_c(deltas, weights, params, ctx):
    total = torch.tensordot(weights.double(), deltas.double(), dims=1)
    if deltas.dim() != 3:
        return (params["lambda"] * total / deltas.shape[0]).to(deltas.dtype)
    b, a, _ = _iso(*torch.linalg.svd(total, full_matrices=False), params["lambda"], total.shape)
    return (b @ a).to(deltas.dtype)
