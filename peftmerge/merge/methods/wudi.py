"""WUDI-Merging (Cheng et al., ICML 2025, "Whoever Started the Interference Should End It: Guiding Data-Free Model
Merging via Task Vectors", arXiv:2503.08099; official code nathanielyvo/WUDI-Merging).

A linear layer's task vector dW_i spans (approximately) the inputs x the layer sees on task i, so the interference
the merge dW causes on task i, (dW - dW_i) x, is measured without data by (dW - dW_i) dW_i^T (the paper's objective,
as the official code computes it)::

    L(dW) = sum_i || (dW - w_i dW_i) (w_i dW_i)^T ||_F^2 / || w_i dW_i ||_F^2
    start:  dW = sum_i w_i dW_i   (task arithmetic)
    then ``steps`` Adam steps (lr ``learning_rate``, betas 0.9 / 0.999, eps 1e-8) on L

The gradient is 2 (dW S - C) with S = sum_i dW_i^T dW_i / ||dW_i||^2 and C = sum_i dW_i dW_i^T dW_i / ||dW_i||^2,
both formed once (S from its eigenvectors where it has low rank: LoRA task vectors of rank r give rank <= n r), so a
step costs one product with dW. Rows are the weight's rows, as stored (the official code merges the state-dict
tensors). Other tensors (biases, norms): the sum, the start, as the official code leaves them. In Core Space the
same loss is minimised over the cores (``--space core``, the default for an adapter output: as accurate as full space
on the benchmark adapters and 50x faster, docs/spaces.md), where no update leaves the inputs' subspace; in full space
Adam's sign-like first steps move every entry of dW.

Defaults: 300 steps and learning rate 1e-5 (the paper and the official ViT code; its RoBERTa code uses 2e-5). The
learning rate is ``learning_rate`` (``search`` takes ``--lr`` for its own layer-wise optimiser).
"""

import torch

from ..registry import Param, register
from . import ops

STEPS = Param("steps", 300, "Adam steps of WUDI's interference loss", low=0, neutral=0, grid=(100, 300, 1000))
LEARNING_RATE = Param("learning_rate", 1e-5, "Adam learning rate of WUDI's interference loss", low=0.0,
                      grid=(5e-6, 1e-5, 2e-5, 5e-5))


def interference(deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, C)``: sum_i dW_i^T dW_i / ||dW_i||^2 (d_in, d_in) and sum_i dW_i dW_i^T dW_i / ||dW_i||^2 (d_out, d_in)
    of the nonzero task vectors ``deltas`` (n, d_out, d_in); the loss's gradient is 2 (dW S - C)."""
    s = torch.zeros(deltas.shape[2], deltas.shape[2], dtype=deltas.dtype)
    c = torch.zeros(deltas.shape[1:], dtype=deltas.dtype)
    for d in deltas:
        norm2 = d.square().sum()
        if norm2 > 0:
            gram = d.T @ d / norm2
            s += gram
            c += d @ gram
    return s, c


def low_rank(s: torch.Tensor):
    """``(Q, e)`` with S = Q diag(e) Q^T over S's nonzero eigenvalues, or None where S is not of low rank."""
    e, q = torch.linalg.eigh(s)
    keep = e > e[-1] * s.shape[0] * torch.finfo(s.dtype).eps if e.numel() else e > 0
    if int(keep.sum()) * 2 > s.shape[0]:
        return None
    return q[:, keep], e[keep]


def adam(x: torch.Tensor, grad, steps: int, lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> torch.Tensor:
    """``steps`` Adam steps from ``x`` along ``grad(x)`` (torch.optim.Adam's update, written out)."""
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    for t in range(1, steps + 1):
        g = grad(x)
        m.mul_(betas[0]).add_(g, alpha=1 - betas[0])
        v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
        denom = (v.sqrt() / (1 - betas[1] ** t) ** 0.5).add_(eps)
        x = x.addcdiv(m, denom, value=-lr / (1 - betas[0] ** t))
    return x


@register("wudi", paper="https://arxiv.org/abs/2503.08099", params=(STEPS, LEARNING_RATE), lora_space="core")
def wudi(deltas, weights, params, ctx):
    task_vectors = ops.weighted(deltas.double(), weights)
    start = task_vectors.sum(dim=0)
    if deltas.dim() != 3 or params["steps"] == 0:
        return start.to(deltas.dtype)
    s, c = interference(task_vectors)
    factored = low_rank(s)
    if factored is None:
        grad = lambda x: 2 * (x @ s - c)
    else:
        q, e = factored
        grad = lambda x: 2 * (((x @ q) * e) @ q.T - c)
    return adam(start, grad, params["steps"], params["learning_rate"]).to(deltas.dtype)
