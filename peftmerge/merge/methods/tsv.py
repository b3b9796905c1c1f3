"""TSV-Merge (Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task Interference in Model
Merging", arXiv:2412.00081; official code AntoAndGar/task_singular_vectors).

Per 2-D tensor, each task vector keeps its top-k singular triplets, k = floor(min(d_out, d_in) / n)::

    w_i dW_i ~ U_i S_i V_i^T                          (top k of each input)
    U = [U_1 .. U_n],  S = diag(S_1 .. S_n),  V = [V_1 .. V_n]
    U_perp = P_U Q_U^T  (polar factor: U = P_U Sigma_U Q_U^T),  V_perp likewise     (decorrelation)
    dW = lambda * U_perp S V_perp^T

The orthogonalization (Procrustes: the nearest matrix with orthonormal columns) removes the overlap of
the tasks' singular subspaces, the paper's measure of interference. Other tensors (biases, norms): the
mean of the task vectors, as the paper does.

LoRA reading: a rank-r task vector has only r nonzero singular values, so k is also capped at each
input's numerical rank (singular values above 1e-6 of its largest). The paper's k counts directions of a
full-rank matrix; zero-singular-value directions carry nothing and would only perturb the polar factor.
With full-rank inputs this is exactly the paper's algorithm. LoRA inputs merge in factor space: each
SVD from QR of B_i and A_i^T and the SVD of the small core, the polar factors of thin (d, sum k_i) matrices,
output rank sum k_i; never a dense dW. Defaults: lambda 1 (the paper's alpha).
"""

import torch

from ..registry import LAMBDA, register
from .lowrank import factor_svd

RTOL = 1e-6


def nonzero_top(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int):
    """The top-``k`` triplets of an SVD with nonzero singular value (relative ``RTOL``)."""
    keep = min(k, int((s > RTOL * s[0]).sum())) if s.numel() and s[0] > 0 else 0
    return u[:, :keep], s[:keep], vh[:keep]


def top_triplets(m: torch.Tensor, k: int):
    """The top-``k`` singular triplets of dense ``m`` with nonzero singular value."""
    return nonzero_top(*torch.linalg.svd(m, full_matrices=False), k)


def polar(m: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor of ``m`` (the nearest matrix with orthonormal columns or rows)."""
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh


def _tsv(parts: list, lam: float, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) = (lambda U_perp S, V_perp^T) from each input's kept triplets."""
    parts = [p for p in parts if p[1].numel()]
    if not parts:
        return torch.zeros(shape[0], 1), torch.zeros(1, shape[1])
    u = polar(torch.cat([p[0] for p in parts], dim=1))
    vh = polar(torch.cat([p[2] for p in parts], dim=0))
    return lam * u * torch.cat([p[1] for p in parts]), vh


def tsv_factored(factors: list, n: int, shape, params: dict, ctx=None):
    """TSV-Merge of LoRA inputs ``[(w_i s_i B_i, A_i) or None, ...]`` (``n`` inputs in all) in factor space."""
    k = max(1, min(shape) // n)
    parts = [nonzero_top(*factor_svd(b.double(), a.double()), k) for b, a in filter(None, factors)]
    b, a = _tsv(parts, params["lambda"], shape)
    return b.float(), a.float()


@register("tsv", paper="https://arxiv.org/abs/2412.00081", params=(LAMBDA,), aliases=("tsv_merge",),
          factored=tsv_factored)
def tsv(deltas, weights, params, ctx):
    scaled = deltas.double() * weights.double().view(-1, *[1] * (deltas.dim() - 1))
    if deltas.dim() != 3:
        return (params["lambda"] * scaled.mean(0)).to(deltas.dtype)
    k = max(1, min(deltas.shape[1:]) // deltas.shape[0])
    b, a = _tsv([top_triplets(d, k) for d in scaled], params["lambda"], deltas.shape[1:])
    return (b @ a).to(deltas.dtype)
