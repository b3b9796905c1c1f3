"""Exact top-k magnitude thresholds of one tensor's task vectors, over row blocks.

Used by TIES' trim in :mod:`.blocked`: keeping exactly ``k`` entries of |dW_i| needs the
k-th largest magnitude of the whole tensor. First one pass of sampling-bracketed selection (Floyd & Rivest
1975, "Expected time bounds for selection", Alg. SELECT): a seeded sample of |dW_i| brackets the k-th
largest between two of its order statistics; one pass counts the entries above the bracket and keeps
those inside it (~1% of the tensor), and the exact value is selected among them. Where a bracket misses
(about one time in 10^6), two histogram passes over the 31 bits of float32 |x| (the high 15, then the
low 16 inside the chosen bucket; radix select) fix it exactly instead. Either way on the worker threads,
never a serial quickselect over a float32 copy of the tensor.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import selection
from .blocks import Deltas, _scratch, run_blocks

_HI, _LO = 1 << 15, 1 << 16  # radix digits: high 15 bits of |x| (sign dropped), then the low 16


@dataclass
class Cut:
    """Input i keeps |x| > t, plus the entries equal to t up to flat index ``tie_end`` (exclusive)."""

    t: float
    tie_end: int  # entries == t at flat index < tie_end are kept; numel keeps all, 0 none


def _abs_bits(x: Tensor, out: Tensor) -> Tensor:
    """|x|'s bit pattern as int32 (monotone in |x| for float32)."""
    return torch.bitwise_and(x.view(torch.int32), 0x7FFFFFFF, out=out.view(torch.int32))


def topk_cuts(src: Deltas, ks: list[int], workers: int | None = None) -> list[Cut | None]:
    """Per input, the :class:`Cut` that keeps exactly its ``k`` largest |dW_i| (ties in index order):
    :func:`band_cuts` where its bracket holds the k-th largest, :func:`radix_cuts` for the others."""
    cuts, missed = band_cuts(src, ks, workers)
    if missed:
        rest = radix_cuts(src, [k if i in missed else 0 for i, k in enumerate(ks)], workers)
        for i in missed:
            cuts[i] = rest[i]
    return cuts


SAMPLE = 1 << 17  # sample size of the bracket: its quantiles are within ~0.1% (one sigma) of the tensor's


def bracket(src: Deltas, i: int, k: int) -> tuple[float, float, float]:
    """(lo, estimate, hi): lo <= the k-th largest |dW_i| <= hi with probability ~1 - 10^-6
    (:func:`selection.bracket` on a seeded sample), and the sample's own quantile as an estimate of it."""
    m = min(SAMPLE, src.numel)
    gen = torch.Generator().manual_seed(src.numel * 31 + k * 7 + i)
    sample = src.sample(i, torch.randint(0, src.numel, (m,), generator=gen)).abs_().numpy()
    at = list(selection.bracket(src.numel, k, m))
    part = np.partition(sample, at)
    return float(part[at[0]]), float(part[at[1]]), float(part[at[2]])


def _trivial_cuts(src: Deltas, ks: list[int]) -> tuple[list[Cut | None], list[int]]:
    """Cuts that need no pass (absent input or k >= numel: ``None``, keep all; k <= 0: keep nothing) and
    the inputs that do need a threshold."""
    cuts: list[Cut | None] = [None] * src.n
    live = []
    for i, k in enumerate(ks):
        if src.inputs[i] is None or k >= src.numel:
            continue
        if k <= 0:
            cuts[i] = Cut(float("inf"), 0)
        else:
            live.append(i)
    return cuts, live


def band_cuts(src: Deltas, ks: list[int], workers: int | None = None) -> tuple[list[Cut | None], list[int]]:
    """Cuts from one pass (:func:`fused.band`): per input, the count of |x| > hi and the values lo <= |x| <= hi
    (in index order) for its sample bracket [lo, hi]; the k-th largest is the (k - count)-th largest inside.
    Returns the cuts and the inputs whose bracket missed (left ``None`` for :func:`radix_cuts`)."""
    from . import fused  # numba, imported by the merges that use it

    cuts, live = _trivial_cuts(src, ks)
    if not live:
        return cuts, []
    brackets = {i: (lo, hi) for i, (lo, _, hi) in
                zip(live, run_blocks(lambda j: bracket(src, live[j], ks[live[j]]), len(live), workers))}

    def block(j):
        r0, r1 = src.span(j)
        rows = r1 - r0
        base_f = src.base_block(r0, r1, _scratch.get("base", rows, src.cols)) if src.base is not None else None
        buf = _scratch.get("band", 1, rows * src.cols + 1).view(-1).numpy()
        found = {}
        for i in live:
            x = src.get(i, r0, r1, _scratch.get(("x", 0), rows, src.cols), base_f)
            lo, hi = brackets[i]
            above, n = fused.band(x.reshape(-1).numpy(), np.float32(lo), np.float32(hi), buf)
            found[i] = (above, torch.from_numpy(buf[:n].copy()))
        return found

    parts = run_blocks(block, src.nblocks, workers)
    missed = []
    for i in live:
        above = sum(p[i][0] for p in parts)
        need = ks[i] - above  # the k-th largest is the need-th largest inside the band
        band = torch.cat([p[i][1] for p in parts])
        if not 1 <= need <= band.numel():
            missed.append(i)
            continue
        t = float(torch.kthvalue(band, band.numel() - need + 1).values)
        keep_ties = need - int(torch.gt(band, t).sum())  # entries equal to t to keep, >= 1
        cuts[i] = Cut(t, src.numel)
        if keep_ties < int(torch.eq(band, t).sum()):
            counts = [int(torch.eq(p[i][1], t).sum()) for p in parts]
            _set_tie_end(src, i, cuts[i], counts, keep_ties)
    return cuts, missed


def _set_tie_end(src: Deltas, i: int, cut: Cut, counts: list[int], need: int) -> None:
    """``cut.tie_end``: the flat index just past input i's ``need``-th entry with |x| == t, given the number of
    such entries in each block (``counts``)."""
    tbits = int(torch.tensor(cut.t).view(torch.int32))
    seen = 0
    for j, c in enumerate(counts):
        if seen + c >= need:  # the block where the kept ties end
            r0, r1 = src.span(j)
            base_f = src.base_block(r0, r1, torch.empty(r1 - r0, src.cols)) if src.base is not None else None
            x = src.get(i, r0, r1, torch.empty(r1 - r0, src.cols), base_f)
            eq = _abs_bits(x, torch.empty(r1 - r0, src.cols)).eq_(tbits).reshape(-1)
            cut.tie_end = r0 * src.cols + int(torch.nonzero(eq)[need - seen - 1]) + 1
            return
        seen += c


def radix_cuts(src: Deltas, ks: list[int], workers: int | None = None) -> list[Cut | None]:
    """Per input, the :class:`Cut` that keeps exactly its ``k`` largest |dW_i| (ties in index order).

    Radix select: pass 1 histograms the high 15 bits of |x| to find the bucket holding the k-th largest;
    pass 2 histograms the low 16 bits inside it, which fixes the value t exactly; pass 3 (only when more
    entries equal t than are needed) finds the flat index where the kept ties end. ``None``: keep all.
    """
    cuts, live = _trivial_cuts(src, ks)

    def from_top(h: Tensor, k: int) -> tuple[int, int]:
        """Bin b holding the k-th largest, and the count in bins above it."""
        above = h.flip(0).cumsum(0)  # above[m] = entries in the top m + 1 bins
        m = min(int(torch.searchsorted(above, torch.tensor(k))), h.numel() - 1)
        return h.numel() - 1 - m, int(above[m - 1]) if m > 0 else 0

    h1 = _histograms(src, live, lambda i, bits: bits.bitwise_right_shift_(16), _HI, workers)
    buckets, above1 = {}, {}
    for i in live:
        buckets[i], above1[i] = from_top(h1[i], ks[i])
    # pass 2: bin 0 = below the bucket, 1 + low bits inside it, _LO + 1 = above it
    h2 = _histograms(src, live, lambda i, bits: bits.sub_((buckets[i] << 16) - 1).clamp_(0, _LO + 1), _LO + 2,
                     workers)
    ties = {}  # input -> (bits of t, how many entries equal to t to keep)
    for i in live:
        inside = h2[i][1:_LO + 1]
        b, above2 = from_top(inside, ks[i] - above1[i])
        bits = (buckets[i] << 16) | b
        t = float(torch.tensor(bits, dtype=torch.int32).view(torch.float32))
        need = ks[i] - above1[i] - above2  # entries equal to t to keep, 1 <= need <= count
        cuts[i] = Cut(t, src.numel)
        if need < int(inside[b]):
            ties[i] = (bits, need)
    if ties:
        _tie_ends(src, ties, cuts, workers)
    return cuts


def _scan(src: Deltas, live: list[int], per_block, workers: int | None) -> list[dict]:
    """``per_block(i, bits)`` for each input in ``live`` and each block (bits: int32 |x| of the block,
    a scratch buffer it may overwrite), on the worker threads; one {input: result} per block, in order."""
    def block(j):
        r0, r1 = src.span(j)
        base_f = src.base_block(r0, r1, _scratch.get("base", r1 - r0, src.cols)) if src.base is not None else None
        out = {}
        for i in live:
            x = src.get(i, r0, r1, _scratch.get(("x", 0), r1 - r0, src.cols), base_f)
            out[i] = per_block(i, _abs_bits(x, _scratch.get("bits", r1 - r0, src.cols)))
        return out

    return run_blocks(block, src.nblocks, workers)


def _histograms(src: Deltas, live: list[int], bin_of, size: int, workers: int | None) -> dict[int, Tensor]:
    """Per input, the histogram (``size`` bins) of ``bin_of(i, bits)`` over the tensor; each worker thread
    accumulates its own, summed at the end."""
    local, parts = threading.local(), []

    def per_block(i, bits):
        acc = getattr(local, "acc", None)
        if acc is None:
            acc = local.acc = {k: torch.zeros(size, dtype=torch.int64) for k in live}
            parts.append(acc)
        acc[i].add_(torch.bincount(bin_of(i, bits).reshape(-1), minlength=size))

    _scan(src, live, per_block, workers)
    return {i: sum(p[i] for p in parts) for i in live}


def _tie_ends(src: Deltas, ties: dict, cuts: list, workers: int | None) -> None:
    """Set each tied input's ``tie_end``: the flat index just past its ``need``-th entry equal to t."""
    def count(i, bits):
        return int(torch.eq(bits, ties[i][0]).sum())

    counts = _scan(src, list(ties), count, workers)
    for i, (_, need) in ties.items():
        _set_tie_end(src, i, cuts[i], [c[i] for c in counts], need)
