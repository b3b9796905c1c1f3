"""DARE (Yu et al., 2024, "Language Models are Super Mario", arXiv:2311.03099).

    drop:     m_i ~ Bernoulli(1 - p) elementwise, p = 1 - density
    rescale:  dW_i' = m_i * dW_i / (1 - p)
    dare_linear: dW = lambda * sum_i w_i dW_i'
    dare_ties:   TIES' sign election and disjoint mean on the dW_i'

Masks come from a generator seeded with ``seed`` and the module name, so a merge is reproducible.
Defaults: the paper's drop rate p = 0.9 (density 0.1), lambda 1, sign total.
"""

import torch

from ..registry import DENSITY, LAMBDA, SEED, SIGN, Sparse, register
from . import ops


def _drop_and_rescale(deltas, params, ctx):
    density = params["density"]
    keep = ops.bernoulli_mask(deltas, density, ctx.generator)
    per_input = torch.as_tensor(density, dtype=deltas.dtype).expand(deltas.shape[0])
    return ops.weighted(deltas * keep, 1.0 / per_input)


@register("dare_linear", paper="https://arxiv.org/abs/2311.03099", params=(LAMBDA, DENSITY(0.1), SEED),
          sparse=Sparse("random", "sum"))
def dare_linear(deltas, weights, params, ctx):
    return params["lambda"] * ops.consensus(_drop_and_rescale(deltas, params, ctx), weights, "sum")


@register("dare_ties", paper="https://arxiv.org/abs/2311.03099", params=(LAMBDA, DENSITY(0.1), SIGN, SEED),
          sparse=Sparse("random", "ties"))
def dare_ties(deltas, weights, params, ctx):
    return params["lambda"] * ops.consensus(_drop_and_rescale(deltas, params, ctx), weights, "ties", params["sign"])
