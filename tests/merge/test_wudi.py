"""WUDI-Merging against the official algorithm (autograd and torch's Adam, ``tests/golden/official.py``) on low-rank
task vectors (the eigenvector path of the gradient; full-rank ones are golden cases), and its invariants."""

import pytest
import torch

from golden import official
from peftmerge.merge import execute, registry


def run(deltas, weights=None, **given):
    m = registry.get("wudi")
    w = torch.ones(deltas.shape[0]) if weights is None else weights
    return execute.dense(m, deltas, w, m.resolve(given, deltas.shape[0]), registry.Context("m"))


def loss(merged, deltas):
    """The paper's objective: sum_i ||(dW - dW_i) dW_i^T||^2 / ||dW_i||^2."""
    return sum(float(((merged - d) @ d.T).square().sum() / d.square().sum()) for d in deltas.double())


@pytest.fixture
def lora():
    """Three rank-2 task vectors (16, 24): S = sum_i dW_i^T dW_i / ||dW_i||^2 has rank 6 of 24."""
    g = torch.Generator().manual_seed(4)
    return torch.stack([torch.randn(16, 2, generator=g) @ torch.randn(2, 24, generator=g) for _ in range(3)])


def test_low_rank_task_vectors_equal_the_official_algorithm(lora):
    torch.testing.assert_close(run(lora, steps=100, learning_rate=0.01),
                               official.wudi(lora, iter_num=100, lr=0.01), atol=1e-5, rtol=1e-5)


def test_the_steps_lower_the_interference_from_task_arithmetic(lora):
    start = lora.sum(0)
    merged = run(lora, steps=200, learning_rate=0.01)
    assert loss(merged, lora) < 0.5 * loss(start, lora)
    torch.testing.assert_close(run(lora, steps=0), start)


def test_weights_scale_the_task_vectors_and_orthogonal_tasks_merge_to_their_sum():
    d = torch.zeros(3, 24, 30)
    for i in range(3):  # disjoint rows and columns: no task sees another's update
        d[i, 8 * i:8 * i + 4, 10 * i:10 * i + 5] = torch.randn(4, 5)
    w = torch.tensor([0.5, 2.0, 1.0])
    torch.testing.assert_close(run(d, w), (w[:, None, None] * d).sum(0), atol=1e-5, rtol=1e-5)  # up to Adam's steps
    torch.testing.assert_close(run(d[:1], torch.tensor([0.5])), 0.5 * d[0])
