"""Model Breadcrumbs (Davari & Belilovsky, 2024, "Model Breadcrumbs: Scaling Multi-Task Model Merging with
Sparse Masks", arXiv:2312.06795; official code rezazzr/breadcrumbs).

    mask:  per row, drop the ``gamma`` fraction of largest |dW_i| (outliers), keep the next ``density``
    breadcrumbs:       dW = lambda * sum_i w_i mask_i * dW_i
    breadcrumbs_ties:  TIES' sign election and disjoint mean on the masked dW_i

Defaults: density 0.1 (the paper's best keeps ~10% after dropping the top 1%), gamma 0.01, lambda 1.
"""

from ..registry import DENSITY, GAMMA, LAMBDA, SIGN, Sparse, register
from . import ops


def _crumbs(deltas, params):
    return deltas * ops.breadcrumbs_mask(deltas, params["density"], params["gamma"])


@register("breadcrumbs", paper="https://arxiv.org/abs/2312.06795", params=(LAMBDA, DENSITY(0.1), GAMMA),
          sparse=Sparse("rows", "sum"))
def breadcrumbs(deltas, weights, params, ctx):
    return params["lambda"] * ops.consensus(_crumbs(deltas, params), weights, "sum")


@register("breadcrumbs_ties", paper="https://arxiv.org/abs/2312.06795",
          params=(LAMBDA, DENSITY(0.1), GAMMA, SIGN),
          sparse=Sparse("rows", "ties"))
def breadcrumbs_ties(deltas, weights, params, ctx):
    return params["lambda"] * ops.consensus(_crumbs(deltas, params), weights, "ties", params["sign"])
