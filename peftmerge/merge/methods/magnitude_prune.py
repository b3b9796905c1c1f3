"""Magnitude pruning, then a weighted sum (PEFT's ``magnitude_prune``; the trim step of TIES alone).

    dW = lambda * sum_i w_i topk_density(dW_i)

Defaults: density 0.2, lambda 1; ``granularity=global`` trims over the whole adapter.
"""

from ..registry import DENSITY, GRANULARITY, LAMBDA, Sparse, register
from . import ops


@register("magnitude_prune", paper="https://arxiv.org/abs/2306.01708 (trim step)",
          params=(LAMBDA, DENSITY(0.2), GRANULARITY),
          sparse=Sparse("magnitude", "sum"))
def magnitude_prune(deltas, weights, params, ctx):
    pruned = deltas * ops.magnitude_mask(deltas, params["density"], ctx.thresholds)
    return params["lambda"] * ops.consensus(pruned, weights, "sum")
