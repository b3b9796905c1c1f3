"""The building blocks of every merge method, as pure functions over stacked task vectors.

``deltas`` is always a tensor of shape (n, *shape): the task vectors dW_i of one module for the
n inputs. Sparsifiers return boolean keep-masks of the same shape; consensus steps reduce over dim 0.
Each step has exactly one implementation here; the method files compose them. These are the definitions:
written to be read, not to be fast (:mod:`peftmerge.merge.engine` computes the same, fast, and its tests hold it
equal to these).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor


def per_input(value, n: int) -> list[float]:
    """A per-input parameter (one value, or one per input) as n floats."""
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * n


def magnitude_mask(deltas: Tensor, density: float | Sequence[float], thresholds: Tensor | None = None) -> Tensor:
    """Keep the top ``density`` fraction of each task vector by magnitude (TIES' "trim").

    Per tensor, exactly ``k = int(density * numel)`` entries are kept (PEFT's ``magnitude_based_pruning``);
    entries tied at the k-th magnitude (common in bf16) are kept in index order up to k, deterministically.
    With ``thresholds`` (one per input, from :func:`peftmerge.merge.engine.selection.global_thresholds`) keep
    ``|x| >= t_i`` instead.
    """
    n = deltas.shape[0]
    flat = deltas.reshape(n, -1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    for i, d in enumerate(per_input(density, n)):  # one input at a time: one |dW_i| in memory, not n
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
    t = torch.kthvalue(mags, mags.numel() - k + 1).values  # the k-th largest
    torch.gt(mags, t, out=out)
    need = k - int(torch.count_nonzero(out))
    if need > 0:
        out[torch.nonzero(mags == t).squeeze(1)[:need]] = True


# --- random masks: a counter-based stream -----------------------------------------------------------------
# Entry p of input i draws u(key_i, p): the top 24 bits of SplitMix64 (Steele, Lea & Flood 2014, the ``mix64``
# finalizer) of key_i + (p + 1) * golden. No generator state: any block of a tensor, on any thread, draws its own
# part of the stream directly, so the engine's blocks draw exactly what these references draw.
GOLDEN, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def mask_seed(generator: torch.Generator | None) -> int:
    """The seed of a module's random masks: the first draw of its generator (the global one if None)."""
    return int(torch.randint(0, 1 << 62, (1,), generator=generator))


def stream_key(seed: int, i: int) -> np.uint64:
    """The 64-bit key of input i's stream in a tensor whose mask seed is ``seed``."""
    return np.uint64((seed * GOLDEN + (i + 1) * 0xD1B54A32D192ED03) % (1 << 64))


def splitmix64_uniform(key: int, n: int, start: int = 0) -> np.ndarray:
    """u_p for flat positions p = start .. start + n - 1 of the stream ``key``, as float64 in [0, 1)."""
    with np.errstate(over="ignore"):
        z = np.uint64(key) + (np.arange(start, start + n, dtype=np.uint64) + np.uint64(1)) * np.uint64(GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(40)).astype(np.float64) / float(1 << 24)


def uniforms(deltas: Tensor, generator: torch.Generator | None) -> Tensor:
    """(n, *shape) float64: input i's draws over its flat positions, from the module's ``generator`` (its first draw
    is the mask seed, :func:`mask_seed`)."""
    seed = mask_seed(generator)
    n, numel = deltas.shape[0], deltas[0].numel()
    out = torch.empty(n, numel, dtype=torch.float64)
    for i in range(n):
        out[i] = torch.from_numpy(splitmix64_uniform(stream_key(seed, i), numel))
    return out.reshape(deltas.shape)


def bernoulli_mask(deltas: Tensor, density: float | Sequence[float], generator: torch.Generator | None) -> Tensor:
    """DARE's random drop: keep each entry independently with probability ``density`` (= 1 - p): input i keeps
    flat entry p where its draw u_p < density (:func:`uniforms`)."""
    u = uniforms(deltas, generator)
    return torch.stack([u[i] < d for i, d in enumerate(per_input(density, deltas.shape[0]))])


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
    for i, dens in enumerate(per_input(density, n)):
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
