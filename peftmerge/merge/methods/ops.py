"""The building blocks of every merge method, as pure functions over stacked task vectors.

``deltas`` is always a tensor of shape (n, *shape): the task vectors dW_i of one module for the
n inputs. Sparsifiers return boolean keep-masks of the same shape; consensus steps reduce over dim 0.
Each step has exactly one implementation here; the method files compose them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from . import blocked
from .blocks import _per_input


def _kth_largest(x: Tensor, k: int) -> Tensor:
    """The k-th largest value of a flat tensor (k >= 1), exactly, by selection rather than a full sort.

    Large tensors: bracket the answer between two order statistics of a seeded random sample (Floyd &
    Rivest 1975), count the entries above the bracket and select inside it; a few vectorised passes
    instead of ``kthvalue``'s serial quickselect over everything (2-3x faster on 10^7 entries). Falls back
    to ``kthvalue`` on small tensors or when the bracket misses (rare; the result is exact either way).
    """
    n = x.numel()
    m = 1 << 16
    if n <= 16 * m:
        return torch.kthvalue(x, n - k + 1).values
    gen = torch.Generator().manual_seed(n ^ k)
    sample = torch.sort(x[torch.randint(0, n, (m,), generator=gen)]).values
    q = (n - k) / n  # the answer's quantile from below
    margin = 5.0 * (q * (1 - q) / m) ** 0.5 + 2.0 / m
    lo = float(sample[max(int((q - margin) * m), 0)])
    hi = float(sample[min(int((q + margin) * m), m - 1)])
    over = torch.gt(x, hi)
    above = int(torch.count_nonzero(over))
    if above < k:
        band = x[torch.ge(x, lo).logical_xor_(over)]  # lo <= x <= hi: about 2 * margin of x
        if band.numel() >= k - above:
            return torch.kthvalue(band, band.numel() - (k - above) + 1).values
    return torch.kthvalue(x, n - k + 1).values


def magnitude_mask(deltas: Tensor, density: float | Sequence[float], thresholds: Tensor | None = None) -> Tensor:
    """Keep the top ``density`` fraction of each task vector by magnitude (TIES' "trim").

    Per tensor, exactly ``k = int(density * numel)`` entries are kept (PEFT's ``magnitude_based_pruning``);
    entries tied at the k-th magnitude (common in bf16) are kept in index order up to k, deterministically.
    With ``thresholds`` (one per input, from :func:`global_thresholds`) keep ``|x| >= t_i`` instead.
    """
    n = deltas.shape[0]
    flat = deltas.reshape(n, -1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    for i, d in enumerate(_per_input(density, n)):  # one input at a time: one |dW_i| in memory, not n
        mags = flat[i].abs()
        if thresholds is not None:
            torch.ge(mags, thresholds[i], out=mask[i])
            continue
        k = int(d * mags.numel())
        if k >= mags.numel():
            mask[i] = True
        elif k > 0:
            _top_k(mags, k, mask[i])
    return mask.reshape(deltas.shape)


def _top_k(mags: Tensor, k: int, out: Tensor) -> None:
    """``out`` = mask of exactly the k largest ``mags``; ties at the threshold go to the lowest indices."""
    t = _kth_largest(mags, k)
    torch.gt(mags, t, out=out)
    need = k - int(torch.count_nonzero(out))
    if need > 0:
        out[torch.nonzero(mags == t).squeeze(1)[:need]] = True


def splitmix64_uniform(key: int, n: int) -> np.ndarray:
    """u_p for p = 0..n-1: the top 24 bits of SplitMix64 (Steele, Lea & Flood 2014, the ``mix64`` finalizer)
    of key + (p + 1) * 0x9E3779B97F4A7C15, as float64 in [0, 1)."""
    with np.errstate(over="ignore"):
        z = np.uint64(key) + (np.arange(n, dtype=np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(40)).astype(np.float64) / float(1 << 24)


def bernoulli_mask(deltas: Tensor, density: float | Sequence[float], generator: torch.Generator | None) -> Tensor:
    """DARE's random drop: keep each entry independently with probability ``density`` (= 1 - p).

    The stream is the blocked engine's (:func:`fused.drop`): input i keeps flat entry p where
    ``splitmix64_uniform(stream_key(seed, i))[p] < density``, seed the module's (the first draw of ``generator``).
    """
    from . import fused

    seed = blocked.mask_seed(generator)
    n, numel = deltas.shape[0], deltas[0].numel()
    mask = torch.empty(n, numel, dtype=torch.bool)
    for i, d in enumerate(_per_input(density, n)):
        mask[i] = torch.from_numpy(splitmix64_uniform(fused.stream_key(seed, i), numel) < d)
    return mask.reshape(deltas.shape)


def breadcrumbs_mask(deltas: Tensor, density: float | Sequence[float], gamma: float) -> Tensor:
    """Model Breadcrumbs: per row, drop the top ``gamma`` fraction (outliers), keep the next ``density``.

    Rows are the last dimension, as in the official code (rezazzr/breadcrumbs, ``TaskVectorMiddleKeep``):
    ``int(d * gamma)`` largest entries go, then the ``int(d * density)`` largest of the rest stay. A row
    too short for ``gamma`` (``d * gamma < 1``) loses no outlier; it is never zeroed whole for that.
    Entries tied in magnitude rank by index (the lower index counts as larger).
    """
    n, d = deltas.shape[0], deltas.shape[-1]
    mask = torch.zeros_like(deltas, dtype=torch.bool)
    n_top = int(d * gamma)
    for i, dens in enumerate(_per_input(density, n)):
        n_keep = min(max(int(d * dens), 1), d - n_top)
        mags = deltas[i].abs().reshape(-1, d)
        order = torch.sort(mags, dim=-1, descending=True, stable=True).indices  # stable: ties by index
        mask[i].view(-1, d).scatter_(-1, order[:, n_top:n_top + n_keep], True)
    return mask


def elect_sign(deltas: Tensor, method: str = "total") -> Tensor:
    """TIES' sign election: the mask of entries whose sign agrees with the elected one.

    ``total``: the sign of sum_i dW_i; ``frequency``: the sign held by most inputs. Ties go to +
    (PEFT's ``calculate_majority_sign_mask``). Zero entries (trimmed) never agree.
    """
    if method == "total":
        votes = deltas.sum(dim=0)
    else:
        votes = torch.zeros_like(deltas[0])
        for d in deltas:
            votes.add_(d.sign())
    majority = torch.where(votes >= 0, 1.0, -1.0).to(deltas.dtype)
    agree = torch.empty_like(deltas, dtype=torch.bool)
    for i, d in enumerate(deltas):  # sign(d) == majority  <=>  d * majority > 0 (zeros never agree)
        torch.gt(d * majority, 0, out=agree[i])
    return agree


def disjoint_mean(deltas: Tensor, mask: Tensor, weights: Tensor | None = None) -> Tensor:
    """TIES' disjoint merge: mean over the inputs whose entry is kept, 0 where none is.

    With ``weights`` the kept entries are w_i * dW_i (still divided by their count, PEFT's convention).
    Accumulated one input at a time, so the temporaries are one module, not n.
    """
    kept = torch.zeros_like(deltas[0])
    count = torch.zeros_like(deltas[0])
    w = [1.0] * deltas.shape[0] if weights is None else weights.tolist()
    for d, m, wi in zip(deltas, mask, w):
        kept.add_(d * m, alpha=wi)
        count.add_(m)
    return kept.div_(count.clamp_(min=1))


def weighted(deltas: Tensor, weights: Tensor) -> Tensor:
    """w_i * dW_i, broadcast over the module's shape."""
    return deltas * weights.to(deltas.dtype).reshape(-1, *([1] * (deltas.dim() - 1)))


def consensus(sparse: Tensor, weights: Tensor, how: str, sign: str = "total") -> Tensor:
    """Reduce sparsified task vectors: ``sum`` (sum_i w_i dW_i) or ``ties`` (elect sign, disjoint mean)."""
    if how == "sum":
        return weighted(sparse, weights).sum(dim=0)
    agree = elect_sign(sparse, sign)  # elected on the unweighted vectors, as PEFT and the paper do
    return disjoint_mean(sparse, agree, weights)


def global_thresholds(magnitudes_per_module, n: int, density: float | Sequence[float]) -> Tensor:
    """Per-input magnitude thresholds over ALL modules (TIES' official ``topk_values_mask`` on the flat model).

    ``magnitudes_per_module`` is a callable returning a fresh iterator of (n, *shape) task vectors, read
    twice: pass 1 histograms the top 16 bits of each |x| (monotone for non-negative float32) to find the
    bucket holding the k-th largest value; pass 2 selects it exactly inside that bucket. Memory: one module.
    """
    dens = _per_input(density, n)
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
        out[i] = _kth_largest(vals, ks[i] - above[i])
    return out


# --- PCB (Du et al., 2024), transcribed from duguodong7/pcb-merging ---------------------------------

def _minmax(x: Tensor, dim: int) -> Tensor:
    lo = x.min(dim=dim, keepdim=True).values
    hi = x.max(dim=dim, keepdim=True).values
    return (x - lo) / (hi - lo).clamp(min=torch.finfo(x.dtype).tiny)  # a constant row gives 0, not NaN


def _clamp_quantiles(x: Tensor, low: float, high: float) -> Tensor:
    """Clamp each row of (n, d) ``x`` to [its ``low`` quantile, its ``1 - high`` quantile] (by rank, as the official
    ``clamp``: sorted[int(d*low)] and sorted[int(d*(1-high)) - 1]), with selection instead of a sort."""
    d = x.shape[1]
    lo = torch.kthvalue(x, int(d * low) + 1, dim=1, keepdim=True).values
    hi = torch.kthvalue(x, int(d * (1 - high) - 1) + 1, dim=1, keepdim=True).values
    return torch.maximum(torch.minimum(x, hi), lo)


def pcb_scores(deltas: Tensor, ratio: float, clamp_ratio: float = 1e-4) -> tuple[Tensor, Tensor]:
    """PCB's balancing: returns (clamped task vectors, scores), both (n, d) over the flattened module.

    intra = exp(n * minmax(|dW_i|)^2); inter = tanh(dW_i * sum_j dW_j); score = intra * inter,
    clamped below at its (1 - ratio) quantile (so all but the top ``ratio`` fraction become 0) and min-max
    normalised per input. |dW| is first clamped to its [1e-4, 1 - 1e-4] quantiles (outliers).
    """
    n = deltas.shape[0]
    flat = deltas.reshape(n, -1)
    mags = _clamp_quantiles(flat.abs(), clamp_ratio, clamp_ratio)
    clamped = flat.sign() * mags
    intra = torch.exp(n * _minmax(mags, 1) ** 2)
    inter = torch.tanh(flat * flat.sum(dim=0))
    scores = _minmax(_clamp_quantiles(intra * inter, 1 - ratio, 0.0), 1)
    return clamped, scores
