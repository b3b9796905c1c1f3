"""DELLA-Merging (Deep et al., 2024, "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based
Sampling", arXiv:2406.11617; official code declare-lab/della).

MagPrune drops each entry at random with a probability that falls with its magnitude's rank in its row, rescales
what it keeps so the expectation is dW_i, then merges as TIES does::

    r     = rank of |dW_i| within its row, 0 (smallest) .. cols - 1
    p     = density - epsilon + 2 epsilon r / (cols - 1)     keep probability (drop: 1 - p, in 1 - density +- epsilon)
    dW_i' = dW_i * m / p,   m ~ Bernoulli(p)                  drop, rescale by 1 / (1 - drop probability)
    dW    = lambda * disjoint mean of the dW_i' that agree with sign(sum_i dW_i')    (TIES' elect and merge)

Rows are the weight's rows (a row of one entry keeps with probability ``density``); a ``density`` of 1 keeps every
entry; at ``epsilon`` 0 this is DARE-TIES, mask for mask. Masks come from the module's seeded stream
(:func:`peftmerge.merge.methods.ops.uniforms`), so a merge is reproducible. ``epsilon`` is the half-width of the
keep probabilities, as mergekit's ``della`` reads it (the official example's window 0.14 is epsilon 0.07); the
consensus is TIES' as ``peftmerge combine --method ties`` computes it (signs elected on the unweighted dW_i').
Defaults: the official example's drop rate 0.3 (density 0.7) and window 0.14; lambda 1 (the example tunes 1.1: see
``peftmerge search``).
"""

import torch

from ...errors import PeftmergeError
from ...registry import Param
from ..registry import DENSITY, LAMBDA, SEED, SIGN, Sparse, register
from . import ops

EPSILON = Param("epsilon", 0.07, "half-width of DELLA's keep probabilities around density, by magnitude rank in "
                "the row", low=0.0, high=0.5, neutral=0.0, grid=(0.0, 0.05, 0.1, 0.15))


def keep_probabilities(mags: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """(rows, cols) float64: density - epsilon + 2 epsilon (rank of each |x| in its row) / (cols - 1); entries
    tied in magnitude rank by index."""
    rows, cols = mags.shape
    order = torch.argsort(mags, dim=1, stable=True)
    ranks = torch.empty(rows, cols, dtype=torch.float64)
    ranks.scatter_(1, order, torch.arange(cols, dtype=torch.float64).expand(rows, cols))
    spread = ranks / (cols - 1) if cols > 1 else torch.full_like(ranks, 0.5)
    return (density - epsilon) + 2 * epsilon * spread


def magprune(x: torch.Tensor, density: float, params: dict, draw) -> None:
    """MagPrune on rows ``x`` (rows, cols) in place: keep where the draw u < p, rescaled by 1 / p (``draw()``: the
    rows' uniform draws)."""
    if density >= 1:
        return
    p = keep_probabilities(x.abs(), density, params["epsilon"])
    x.mul_(torch.where(draw() < p, 1.0 / p, 0.0).to(x.dtype))


def _check(params: dict) -> None:
    """The keep probabilities density +- epsilon lie in (0, 1] (a density of 1 keeps everything)."""
    eps, density = params["epsilon"], params["density"]
    for d in density if isinstance(density, list) else [density]:
        if d < 1 and (d - eps <= 0 or d + eps > 1):
            raise PeftmergeError(f"della keeps entries with probabilities density +- epsilon, which must lie in "
                                 f"(0, 1]: density {d} with epsilon {eps} gives [{d - eps:g}, {d + eps:g}]; lower "
                                 "epsilon")


@register("della", paper="https://arxiv.org/abs/2406.11617", params=(LAMBDA, DENSITY(0.7), EPSILON, SIGN, SEED),
          sparse=Sparse(magprune, "ties"), check=_check)
def della(deltas, weights, params, ctx):
    n = deltas.shape[0]
    cols = deltas.shape[-1] if deltas.dim() >= 3 else deltas[0].numel()  # rows as the engine sees them
    u = ops.uniforms(deltas, ctx.generator)
    kept = deltas.clone()
    for i, density in enumerate(ops.per_input(params["density"], n)):
        magprune(kept[i].view(-1, cols), density, params, lambda i=i: u[i].reshape(-1, cols))
    return params["lambda"] * ops.consensus(kept, weights, "ties", params["sign"])
