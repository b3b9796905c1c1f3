"""RegMean (Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models",
arXiv:2212.09849; official code bloomberg/dataless-model-merging).

Each linear layer's merged weight is the one whose outputs are closest to every input model's outputs on
that model's own inputs (Sec. 3.2, Eq. 1-3)::

    min_W sum_i || X_i W^T - X_i W_i^T ||^2   =>   W = (sum_i W_i G_i) (sum_i G_i)^-1,   G_i = X_i^T X_i

with the off-diagonal entries of every G_i scaled by ``off_diagonal`` (the paper's alpha, Sec. 3.3: 1 is the exact
least-squares solution, 0 a per-input-feature weighted mean). On task vectors W_i = W0 + w_i dW_i the
base cancels: dW = sum_i w_i dW_i G_i (sum_j G_j)^-1, linear in the inputs, so LoRA inputs merge exactly in
factor space, B = [w_i s_i B_i], A = [A_i G_i G^-1] (output rank = the sum of the input ranks).

G_i comes from :func:`peftmerge.analysis.grams`: the mean over tokens of x x^T of the layer's inputs while input i's
adapter runs on rows of its own task (a mean, so every task weighs the same whatever its number of rows;
the paper's sum over equally many examples per task differs only by that per-task count). Tensors without a
Gram matrix (embeddings, biases): the mean of the weighted task vectors, as the paper averages the weights
that are not linear layers. Labels are never read.
"""

import torch

from ...errors import PeftmergeError
from ..registry import Param, register

OFF_DIAGONAL = Param("off_diagonal", 1.0, "scale of the Gram matrices' off-diagonal entries (1: exact least "
                     "squares; the paper's alpha)", low=0.0, high=1.0, grid=(0.5, 0.7, 0.9, 1.0))


def shrink(gram: torch.Tensor, off_diagonal: float) -> torch.Tensor:
    """G with its off-diagonal entries scaled by ``off_diagonal`` (diagonal kept)."""
    return off_diagonal * gram + (1 - off_diagonal) * torch.diag(torch.diagonal(gram))


def shares(lefts: list, grams: list[torch.Tensor], off_diagonal: float) -> list:
    """[L_i G_i (sum_j G_j)^-1] for each input's left matrix L_i (rows x d_in; None: no share), from one
    Cholesky factorization of the sum: dW_i for the dense merge, A_i for the factored one (r_i rows only)."""
    gs = [shrink(g.double(), off_diagonal) for g in grams]
    total = sum(gs)
    eps = 1e-8 * float(torch.diagonal(total).mean().clamp(min=1e-30))  # an unused input feature: no NaN
    total = total + eps * torch.eye(total.shape[0], dtype=total.dtype)
    present = [i for i, left in enumerate(lefts) if left is not None]
    rhs = torch.cat([lefts[i].double() @ gs[i] for i in present])  # X G = rhs  <=>  G X^T = rhs^T (G symmetric)
    chol, info = torch.linalg.cholesky_ex(total)
    x = (torch.cholesky_solve(rhs.T, chol) if int(info) == 0 else torch.linalg.solve(total, rhs.T)).T
    out = [None] * len(lefts)
    for i, part in zip(present, x.split([lefts[i].shape[0] for i in present])):
        out[i] = part
    return out


def _grams(ctx, n: int) -> list[torch.Tensor] | None:
    grams = ctx.grams
    if grams is None:
        return None
    if len(grams) != n or any(g is None for g in grams):
        raise PeftmergeError(f"module {ctx.module}: Gram matrices for {sum(g is not None for g in grams)} of "
                             f"{n} inputs; compute them for every input with `peftmerge grams`")
    return grams


def regmean_factored(factors: list, n: int, shape, params: dict, ctx):
    """RegMean of LoRA inputs ``[(w_i s_i B_i, A_i) or None, ...]`` in factor space:
    (B, A) = ([B_i], [A_i G_i G^-1]).
    An input that does not adapt this module (None) adds no factor but its G_i still counts in the sum."""
    grams = _grams(ctx, n)
    present = [(i, f) for i, f in enumerate(factors) if f is not None]
    b = torch.cat([f[0] for _, f in present], dim=1)
    if grams is None:
        return b / n, torch.cat([f[1] for _, f in present], dim=0)
    parts = shares([f and f[1] for f in factors], grams, params["off_diagonal"])
    return b, torch.cat([parts[i].float() for i, _ in present], dim=0)


def components(deltas: torch.Tensor, params: dict, ctx) -> torch.Tensor:
    """(n, *shape): each input's share dW_i G_i G^-1 of the merge (dW_i / n without Gram matrices), so that RegMean
    with weights w is sum_i w_i share_i (what a layer-wise search learns coefficients over)."""
    grams = _grams(ctx, deltas.shape[0]) if deltas.dim() == 3 else None
    if grams is None:
        return deltas / deltas.shape[0]
    return torch.stack(shares(list(deltas), grams, params["off_diagonal"])).to(deltas.dtype)


@register("regmean", paper="https://arxiv.org/abs/2212.09849", params=(OFF_DIAGONAL,), factored=regmean_factored,
          needs_grams=True, components=components)
def regmean(deltas, weights, params, ctx):
    parts = components(deltas.double(), params, ctx)
    return torch.tensordot(weights.double(), parts, dims=1).to(deltas.dtype)
