"""TIES-Merging (Yadav et al., 2023, "Resolving Interference When Merging Models", arXiv:2306.01708).

    trim:   keep the top ``density`` fraction of each dW_i by magnitude (per tensor, or over the whole
            adapter with ``granularity=global`` as the official code does)
    elect:  gamma = sign(sum_i trim(dW_i))   (``sign=total``; ``frequency``: majority of signs)
    merge:  dW = lambda * mean over {i : sign(trim(dW_i)) = gamma} of w_i trim(dW_i)

The disjoint mean divides the weighted agreeing entries by their count (PEFT's convention); with all
weights 1 this is the paper's equation. Defaults: density 0.2 (top-20%), lambda 1, sign total.
"""

from ..registry import DENSITY, GRANULARITY, LAMBDA, SIGN, Sparse, register
from . import ops


@register("ties", paper="https://arxiv.org/abs/2306.01708", params=(LAMBDA, DENSITY(0.2), SIGN, GRANULARITY),
          sparse=Sparse("magnitude", "ties"))
def ties(deltas, weights, params, ctx):
    trimmed = deltas * ops.magnitude_mask(deltas, params["density"], ctx.thresholds)
    return params["lambda"] * ops.consensus(trimmed, weights, "ties", params["sign"])
