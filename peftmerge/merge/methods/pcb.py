"""PCB-Merging (Du et al., 2024, "Parameter Competition Balancing for Model Merging", arXiv:2410.02396;
official code duguodong7/pcb-merging).

    intra_i = exp(n * minmax(|dW_i|)^2)                  (intra-balancing: importance within a task)
    inter_i = tanh(dW_i * sum_j dW_j)                    (inter-balancing: agreement across tasks)
    s_i     = minmax(clamp_below(intra_i * inter_i, quantile 1 - density))   (drop all but the top)
    dW      = lambda * sum_i w_i s_i clamp(dW_i) / sum_i s_i

``clamp`` cuts |dW_i| to its [1e-4, 1 - 1e-4] quantiles (outliers). The per-input weights w_i are the
paper's per-model lambdas (searched by evolution there; see ``peftmerge search``). Computed per tensor.
Defaults: density (the paper's ``pcb_ratio``) 0.1, lambda 1.
"""

from ..registry import LAMBDA, Param, register
from . import ops

RATIO = Param("density", 0.1, "fraction of entries KEPT (PCB's ratio)", low=0.0, high=1.0, low_open=True, neutral=1.0,
              grid=(0.1, 0.2, 0.4, 0.7))


@register("pcb", paper="https://arxiv.org/abs/2410.02396", params=(LAMBDA, RATIO))
def pcb(deltas, weights, params, ctx):
    clamped, scores = ops.pcb_scores(deltas, params["density"])
    num = (ops.weighted(clamped, weights) * scores).sum(dim=0)
    merged = num / scores.sum(dim=0).clamp(min=1e-12)  # (d,)
    return params["lambda"] * merged.reshape(deltas.shape[1:])
