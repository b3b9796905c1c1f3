"""The sample-bracketed selection behind TIES' trim is exact: it equals torch.kthvalue."""

import pytest
import torch

from peftmerge.merge.engine import selection


@pytest.mark.parametrize("n", [1000, 1_500_000])
def test_kth_largest_equals_kthvalue(n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen).abs()
    x[::7] = 0.5  # many equal values
    for k in (1, 2, int(0.2 * n), int(0.5 * n), int(0.9 * n), n - 1, n):
        assert selection.kth_largest(x, k) == torch.kthvalue(x, n - k + 1).values
    y = torch.zeros(n)
    y[:10] = 1.0  # almost all equal: the bracket is degenerate
    for k in (1, 10, 11, n // 2, n):
        assert selection.kth_largest(y, k) == torch.kthvalue(y, n - k + 1).values
