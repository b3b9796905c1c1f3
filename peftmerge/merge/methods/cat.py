"""Concatenation (PEFT's ``combination_type="cat"``): the exact weighted sum, rank sum_i r_i.

    B = [w_1 s_1 B_1, ..., w_n s_n B_n],  A = [A_1; ...; A_n]   =>   B @ A = sum_i w_i dW_i

Never truncated: the output rank is the sum of the input ranks (use ``task_arithmetic --rank R`` to
truncate), less only where inputs share bit-identical A factors (one block, their B's added, so an adapter
minus itself is exactly zero). No hyperparameters besides the per-input weights (and ``seed``, accepted and
unused).
"""

import torch

from ..registry import register


@register("cat", paper="https://github.com/huggingface/peft (add_weighted_adapter, combination_type='cat')",
          linear=True, exact_concat=True)
def cat(weights: torch.Tensor, params: dict) -> torch.Tensor:
    return weights
