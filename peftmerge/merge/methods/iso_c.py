"""Iso-C (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces", arXiv:2502.04959; official code danielm1405/iso-merging).

Per 2-D tensor, the task-arithmetic sum is made isotropic: its singular vectors are kept and every
singular value is replaced by their mean, so no direction of one task dominates the others::

    sum_i w_i dW_i = U S V^T,   dW = lambda * mean(S) * U V^T

Other tensors (biases, norms): the mean of the task vectors, as the official code does.

LoRA reading: the sum of n rank-r task vectors has rank <= n r; the mean and U V^T run over its nonzero
singular values (above 1e-6 of the largest). The paper's matrices are full rank, where this is exactly its
definition; over the zero ones the mean would shrink and U V^T would add arbitrary null-space directions.
Defaults: lambda 1 (the paper tunes its alpha on validation data; see ``peftmerge search``).
"""

import torch

from ..registry import LAMBDA, register
from .tsv import top_triplets


@register("iso_c", paper="https://arxiv.org/abs/2502.04959", params=(LAMBDA,))
def iso_c(deltas, weights, params, ctx):
    total = torch.tensordot(weights.double(), deltas.double(), dims=1)
    if deltas.dim() != 3:
        return (params["lambda"] * total / deltas.shape[0]).to(deltas.dtype)
    u, s, vh = top_triplets(total, min(total.shape))
    if not s.numel():
        return torch.zeros_like(deltas[0])
    return (params["lambda"] * s.mean() * u @ vh).to(deltas.dtype)
