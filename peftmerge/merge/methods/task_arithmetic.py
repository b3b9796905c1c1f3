"""Task arithmetic (Ilharco et al., 2023, "Editing Models with Task Arithmetic", arXiv:2212.04089).

    dW = lambda * sum_i w_i dW_i

Linear, so peftmerge merges it exactly in factor space (concatenated scaled factors), truncating with
the optimal SVD only where ``--rank`` asks for less than the sum of the input ranks.
Defaults: lambda = 1 (the paper picks lambda on validation data; see ``peftmerge search``).
"""

import torch

from ..registry import LAMBDA, register


@register("task_arithmetic", paper="https://arxiv.org/abs/2212.04089", params=(LAMBDA,), linear=True,
          aliases=("linear",))
def task_arithmetic(weights: torch.Tensor, params: dict) -> torch.Tensor:
    return params["lambda"] * weights
