"""TIES and magnitude prune of LoRA task vectors in one pass over the merged matrix instead of two.

Trimming each dW_i to its top-k magnitudes needs the k-th largest |dW_i|, a property of the whole tensor:
:mod:`.radix` finds it in one pass (sample bracket, count, select) and the merge takes a
second, forming every block of every dW_i (``B_i[rows] @ A_i``) twice. Here the merge runs in the same pass
as the selection (Floyd & Rivest's bracket, used speculatively):

1. a sample brackets each threshold: lo_i <= t_i <= hi_i (:func:`radix.bracket`), and estimates it (t0_i);
2. one pass (:func:`fused.speculate`) merges with each input trimmed at t0_i, counts the |x_i| > hi_i, and
   lists the positions where some |x_i| lies inside its bracket, with their values (~1% per input);
   every other entry is already exact, since above hi or below lo the trim does not depend on t_i;
3. the exact t_i (and where its ties stop being kept, in index order) comes from the listed values, and
   the listed entries are merged again exactly (:func:`fused.merge`), M, its squared norm and M V0 patched.

The result is the matrix :func:`blocked.merge` gives (the tests hold it so); if a bracket misses (about
one time in 10^6) the caller falls back to the two passes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from . import radix
from .blocks import Deltas, _scratch, run_blocks


def merge(src: Deltas, ks: list[int], weights: list[float], ties: bool, by_count: bool, merged: Tensor, v0: Tensor,
          y0: Tensor) -> float | None:
    """Write the trim-at-top-k merge (``ties``: TIES' consensus, else the weighted sum) of ``src``'s inputs
    into ``merged`` and ``merged @ v0`` into ``y0``; returns ||merged||_F^2, or None if a bracket missed
    (``merged`` and ``y0`` then hold nothing useful). ``weights``: per input, lambda folded in."""
    from . import fused  # numba, imported by the merges that use it

    slots = [i for i in range(src.n) if src.inputs[i] is not None]  # the inputs in the kernel's rows
    lo, t0, hi = (np.empty(len(slots), np.float32) for _ in range(3))
    live = []
    for s, i in enumerate(slots):
        if ks[i] >= src.numel:  # keep everything
            lo[s] = t0[s] = hi[s] = -1.0
        elif ks[i] <= 0:  # keep nothing
            lo[s] = t0[s] = hi[s] = np.inf
        else:
            live.append(s)
    for s, b in zip(live, run_blocks(lambda j: radix.bracket(src, slots[live[j]], ks[slots[live[j]]]), len(live))):
        lo[s], t0[s], hi[s] = b
    w = np.array([weights[i] for i in slots], dtype=np.float32)

    def block(j):
        r0, r1 = src.span(j)
        rows, cols = r1 - r0, src.cols
        stack = _scratch.get("stack", len(slots), rows * cols)
        for s, i in enumerate(slots):
            src.get(i, r0, r1, stack[s].view(rows, cols), None)
        above = np.zeros(len(slots), np.int64)
        where = _scratch.get("where", 1, rows * cols + 1).view(-1).view(torch.int32)  # float32 scratch as int32
        sq, found = fused.speculate(stack.numpy(), lo, hi, t0, w, ties, by_count,
                                    merged.view(-1)[r0 * cols:r1 * cols].numpy(), above, where.numpy())
        torch.mm(merged[r0:r1], v0, out=y0[r0:r1])
        at = where[:found].long()
        return sq, above, at + r0 * cols, stack.index_select(1, at)

    parts = run_blocks(block, src.nblocks)
    norm_sq = sum(p[0] for p in parts)
    above = sum(p[1] for p in parts)
    where = torch.cat([p[2] for p in parts])  # flat positions, increasing
    values = torch.cat([p[3] for p in parts], dim=1)  # (inputs, positions)
    t = np.full(len(slots), -1.0, np.float32)
    tie_end = np.zeros(len(slots), np.int64)
    for s in range(len(slots)):
        if s not in live:  # keep all (t = -1) or none (t = inf)
            t[s] = lo[s]
            continue
        t[s], tie_end[s] = fused.threshold(values[s].numpy(), where.numpy(), lo[s], hi[s],
                                           ks[slots[s]] - int(above[s]), src.numel)
        if tie_end[s] < 0:
            return None
    if where.numel():  # the listed entries, merged again at the exact thresholds
        norm_sq += fused.patch(values.numpy(), where.numpy(), t, tie_end, w, ties, by_count, merged.view(-1).numpy(),
                               src.cols, v0.numpy(), y0.numpy())
    return norm_sq
