"""Exact k-th largest selection, faster than a serial quickselect, for TIES' trim.

- :func:`bracket`: a seeded sample brackets the k-th largest of n values between two of its order statistics
  (Floyd & Rivest 1975, "Expected time bounds for selection", Alg. SELECT), missing about one time in 10^6; the
  tensor is then passed once to count the entries above the bracket and keep those inside it (~1%).
- :func:`kth_largest`: that on a flat tensor (the row-blocked version over a tensor's task vectors is
  :mod:`.radix`); :func:`magnitude_mask` is :func:`peftmerge.merge.methods.ops.magnitude_mask` on top of it.
- :func:`global_thresholds`: per-input thresholds over every module of an adapter (``granularity=global``).

All exact: the result is the reference's (``torch.kthvalue``), as the tests check.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..methods.ops import per_input


def bracket(n: int, k: int, m: int) -> tuple[int, int, int]:
    """Positions (lo, estimate, hi) in a sorted sample of ``m`` of ``n`` values between which the k-th largest of
    the n lies with probability ~1 - 10^-6: the sample's order statistics 5 standard deviations (plus 2/m) either
    side of the quantile (n - k) / n, and the quantile itself."""
    q = (n - k) / n  # the answer's quantile from below
    margin = 5.0 * (q * (1 - q) / m) ** 0.5 + 2.0 / m
    return max(int((q - margin) * m), 0), min(int(q * m), m - 1), min(int((q + margin) * m), m - 1)


def kth_largest(x: Tensor, k: int) -> Tensor:
    """The k-th largest value of a flat tensor (k >= 1), exactly, by selection rather than a full sort.

    Large tensors: bracket the answer between two order statistics of a seeded random sample, count the entries
    above the bracket and select inside it: a few vectorised passes instead of ``kthvalue``'s serial quickselect
    over everything. Falls back to ``kthvalue`` on small tensors or when the bracket misses (rare; exact either
    way)."""
    n = x.numel()
    m = 1 << 16
    if n <= 16 * m:
        return torch.kthvalue(x, n - k + 1).values
    gen = torch.Generator().manual_seed(n ^ k)
    sample = torch.sort(x[torch.randint(0, n, (m,), generator=gen)]).values
    lo_at, _, hi_at = bracket(n, k, m)
    lo, hi = float(sample[lo_at]), float(sample[hi_at])
    over = torch.gt(x, hi)
    above = int(torch.count_nonzero(over))
    if above < k:
        band = x[torch.ge(x, lo).logical_xor_(over)]  # lo <= x <= hi: about 2 * margin of x
        if band.numel() >= k - above:
            return torch.kthvalue(band, band.numel() - (k - above) + 1).values
    return torch.kthvalue(x, n - k + 1).values


def magnitude_mask(deltas: Tensor, density: float | Sequence[float]) -> Tensor:
    """:func:`peftmerge.merge.methods.ops.magnitude_mask` (exactly k = int(density numel) kept per input, ties at
    the threshold in index order), its threshold by :func:`kth_largest`."""
    n = deltas.shape[0]
    flat = deltas.reshape(n, -1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    for i, d in enumerate(per_input(density, n)):
        mags = flat[i].abs()
        k = int(d * mags.numel())
        if k >= mags.numel():
            mask[i] = True
        elif k > 0:
            t = kth_largest(mags, k)
            torch.gt(mags, t, out=mask[i])
            need = k - int(torch.count_nonzero(mask[i]))
            if need > 0:
                mask[i][torch.nonzero(mags == t).squeeze(1)[:need]] = True
    return mask.reshape(deltas.shape)


def global_thresholds(magnitudes_per_module, n: int, density: float | Sequence[float]) -> Tensor:
    """Per-input magnitude thresholds over ALL modules (TIES' official ``topk_values_mask`` on the flat model).

    ``magnitudes_per_module`` is a callable returning a fresh iterator of (n, *shape) task vectors, read
    twice: pass 1 histograms the top 16 bits of each |x| (monotone for non-negative float32) to find the
    bucket holding the k-th largest value; pass 2 selects it exactly inside that bucket. Memory: one module.
    """
    dens = per_input(density, n)
    hist = torch.zeros(n, 1 << 16, dtype=torch.int64)
    total = 0
    for deltas in magnitudes_per_module():
        bits = deltas.abs().float().reshape(n, -1).view(torch.int32) >> 15
        for i in range(n):
            hist[i] += torch.bincount(bits[i], minlength=1 << 16)
        total += bits.shape[1]
    ks = [max(1, min(total, int(d * total))) for d in dens]
    buckets, above = [], []
    for i, k in enumerate(ks):
        from_top = hist[i].flip(0).cumsum(0)  # entries in buckets >= b, b counted from the top
        j = int(torch.searchsorted(from_top, torch.tensor(k)))
        bucket = (1 << 16) - 1 - j
        buckets.append(bucket)
        above.append(int(from_top[j - 1]) if j > 0 else 0)
    inside: list[list[Tensor]] = [[] for _ in range(n)]
    for deltas in magnitudes_per_module():
        mags = deltas.abs().float().reshape(n, -1)
        bits = mags.view(torch.int32) >> 15
        for i in range(n):
            inside[i].append(mags[i][bits[i] == buckets[i]])
    out = torch.empty(n)
    for i in range(n):
        vals = torch.cat(inside[i])
        out[i] = kth_largest(vals, ks[i] - above[i])
    return out
