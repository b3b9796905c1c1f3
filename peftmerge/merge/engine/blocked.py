"""The sparsify x consensus merges (TIES, DARE, Model Breadcrumbs, magnitude prune, and every method that declares
a :class:`~peftmerge.merge.registry.Sparse` spec), evaluated in row blocks.

Same definitions as the methods' reference compositions of :mod:`peftmerge.merge.methods.ops` (the tests hold them
equal), computed differently for speed:

- **Row blocks.** Each merge is a chain of ~30 elementwise steps. Over a whole (32000, 1024) tensor every
  step streams it through memory; over blocks of ``BLOCK`` elements the chain runs in the CPU cache. Task
  vectors of full checkpoints are formed block by block (theta_i - theta_0) and never stored whole.
- **One compiled loop nest per block** (:mod:`.fused`, numba): TIES' trim, election and
  disjoint mean (or the weighted sum) and the block's sum of squares, in place of the same chain as torch
  ops (timings: ``docs/engine.md``). DARE's drop, Breadcrumbs' row masks and a method's own row function run in place before it.
- **Threads without barriers** (:mod:`.blocks`). Blocks go to ``torch.get_num_threads()`` worker threads that
  each run torch single-threaded. On shared cores this beats torch's own OpenMP split of every op, which waits at a
  barrier for a descheduled thread after each of the ~30 steps.
- **Exact top-k thresholds** (TIES trim, :mod:`.radix`): a sample brackets the k-th largest
  |dW|, one pass counts the entries above the bracket and keeps those inside it (radix select where a
  bracket misses), instead of a serial quickselect. Entries tied with it are kept in index
  order up to exactly k, as :func:`ops.magnitude_mask` does.
- **Random masks** come from a counter-based stream (:func:`peftmerge.merge.methods.ops.uniforms`; DARE's drop
  compiled in :func:`fused.drop`): entry p of input i draws a hash of (the module's seed, i, p), so the masks do
  not depend on blocks or threads, and equal the references'.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..methods.ops import per_input, splitmix64_uniform, stream_key
from ..registry import Sparse
from .blocks import BLOCK, Deltas, _scratch, run_blocks, single_threaded_caller  # noqa: F401
from .radix import Cut, topk_cuts

# --- one block of the merge --------------------------------------------------------------------------------

def _top_rows(a: Tensor, m: int) -> Tensor:
    """0/1 float mask of the m largest entries of each row of ``a`` (>= 0), ties in index order."""
    d = a.shape[1]
    if m >= d:
        return torch.ones_like(a)
    if m <= 0:
        return torch.zeros_like(a)
    v = torch.topk(a, m, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    gt = torch.gt(a, v)
    eq = torch.eq(a, v)
    need = m - gt.sum(dim=1, keepdim=True)
    keep = gt.logical_or_(eq.logical_and_(eq.cumsum(dim=1) <= need))
    return keep.float()


def crumbs_mask(a: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs' mask of |dW| rows ``a``: drop the top ``int(d * gamma)``, keep the next
    ``int(d * density)`` (at least 1; never more than what is left), ties in index order."""
    d = a.shape[1]
    n_top = int(d * gamma)
    n_keep = min(max(int(d * density), 1), d - n_top)
    keep = _top_rows(a, n_top + n_keep)
    if n_top:
        keep.sub_(_top_rows(a, n_top))
    return keep


def _sparsify(spec: Sparse, x: Tensor, i: int, r0: int, src: Deltas, params: dict, state: dict) -> None:
    """Input i's rows [r0, r0 + len(x)), sparsified in place: DARE's drop, Breadcrumbs' mask or the method's row
    function (TIES' trim is done by :func:`fused.merge`, from ``state["t"]``)."""
    if spec.sparsify == "random":
        from . import fused  # numba: imported only by the merges that run its kernels

        if state["density"][i] < 1.0:
            fused.drop(x.view(-1).numpy(), state["density"][i], stream_key(state["seed"], i), r0 * src.cols)
    elif spec.sparsify == "rows":
        x.mul_(crumbs_mask(x.abs(), state["density"][i], params["gamma"]))
    elif callable(spec.sparsify):
        def draw():  # this block's part of input i's stream
            u = splitmix64_uniform(stream_key(state["seed"], i), x.numel(), r0 * src.cols)
            return torch.from_numpy(u).view(x.shape)

        spec.sparsify(x, state["density"][i], params, draw)


def _merge_block(spec: Sparse, src: Deltas, j: int, weights: list[float], lam: float, params: dict, state: dict,
                 out: Tensor, check: bool = False, visit=None) -> tuple[float, float] | None:
    r0, r1 = src.span(j)
    rows, cols = r1 - r0, src.cols
    base_f = src.base_block(r0, r1, _scratch.get("base", rows, cols)) if src.base is not None else None
    stack = _scratch.get("stack", src.n, rows * cols)  # the present inputs' rows, one per row of the stack
    present = []
    for i in range(src.n):
        buf = stack[len(present)].view(rows, cols)
        x = src.get(i, r0, r1, buf, base_f)
        if x is None:
            continue
        if x.data_ptr() != buf.data_ptr():  # a read-only view of a float32 delta
            buf.copy_(x)
        _sparsify(spec, buf, i, r0, src, params, state)
        present.append(i)
    target = out.view(src.rows, cols)[r0:r1]
    sq = combine_block(spec, stack[:len(present)], present, weights, lam, params, state, r0 * cols, target, base_f)
    if visit is not None:  # while the block is in cache
        visit(j, r0, r1, target, sq)
    return _range(target) if check else None


def combine_block(spec: Sparse, xs: Tensor, present: list[int], weights: list[float], lam: float, params: dict,
                  state: dict, start: int, target: Tensor, base_f: Tensor | None = None) -> float | None:
    """``target`` = (base_f +) lambda * consensus of the inputs ``present`` (``xs``: their float32 entries,
    one row each, already dropped or masked; TIES' trim from ``state``), by :func:`fused.merge`. Returns
    sum(target^2) when target is the merged task vector itself (no base), else None."""
    from . import fused

    rows, cols = target.shape
    direct = base_f is None and lam == 1.0 and target.dtype == torch.float32  # the result goes straight to out
    acc = target if direct else _scratch.get("acc", rows, cols)
    w = np.array([weights[i] for i in present], dtype=np.float32)
    sq = fused.merge(xs.numpy(), state["t"][present], state["tie_end"][present], start, w,
                     spec.consensus == "ties", params.get("sign", "total") != "total", acc.view(-1).numpy())
    if direct:
        return sq
    if base_f is None:  # the merged task vector itself
        target.copy_(acc.mul_(lam))
        return sq * lam * lam
    target.copy_(torch.add(base_f, acc, alpha=lam, out=acc))  # theta_0 + lambda * merged, in out's dtype
    return None


def _range(x: Tensor) -> tuple[float, float] | None:
    lo, hi = torch.aminmax(x)
    return float(lo), float(hi)


# --- the merge -----------------------------------------------------------------------------------------------

def merge(spec: Sparse, src: Deltas, weights, params: dict, *, seed: int = 0, thresholds: Tensor | None = None,
          out: Tensor | None = None, workers: int | None = None, ranges: list | None = None, visit=None) -> Tensor:
    """``lambda * consensus(sparsify(dW_1..n))`` of one tensor; with ``src.base`` and ``out`` given, writes
    ``theta_0 + that`` into ``out`` (any dtype, the tensor's shape) and returns it.

    ``visit(j, r0, r1, rows, sq)``: called on a worker thread with each block's finished output rows [r0, r1)
    (a (r1 - r0, cols) view of ``out``), while they are in cache (e.g. to multiply them by a block of vectors),
    and their sum of squares (float64; None when ``src.base`` is given).
    ``thresholds`` (per input, from :func:`.selection.global_thresholds`): trim to |x| >= t_i instead of top-k.
    ``seed``: the mask seed of this tensor's random masks (:func:`peftmerge.merge.methods.ops.mask_seed`). ``ranges``: a list that gets the
    (min, max) of each block of ``out`` (NaN propagates), for a finiteness check without another pass.
    """
    n = src.n
    w = weights.tolist() if isinstance(weights, Tensor) else [float(x) for x in weights]
    state: dict = {"seed": int(seed)}
    if "density" in params:
        state["density"] = per_input(params["density"], n)
    cuts: list[Cut | None] = [None] * n  # None: no trim
    if spec.sparsify == "magnitude":
        if thresholds is not None:
            cuts = [Cut(float(t), src.numel) for t in thresholds]
        else:
            cuts = topk_cuts(src, [int(d * src.numel) for d in state["density"]], workers)
    # keep |x| > t and the ties |x| == t before flat position tie_end; t = -1 keeps everything
    state["t"] = np.array([-1.0 if c is None else c.t for c in cuts], dtype=np.float32)
    state["tie_end"] = np.array([0 if c is None else c.tie_end for c in cuts], dtype=np.int64)
    lam = float(params.get("lambda", 1.0))
    out = torch.empty(src.shape) if out is None else out
    blocks = run_blocks(lambda j: _merge_block(spec, src, j, w, lam, params, state, out, ranges is not None, visit),
                        src.nblocks, workers)
    if ranges is not None:
        ranges.extend(blocks)
    return out


def linear(src: Deltas, coeffs: list[float], out: Tensor, workers: int | None = None,
           ranges: list | None = None) -> Tensor:
    """``theta_0 + sum_i c_i dW_i`` into ``out`` (any dtype), one input at a time per block:
    theta_0 (1 - sum_theta c_i) + sum_theta c_i theta_i + sum_delta c_i dW_i, so a full checkpoint costs
    one pass, not a subtraction and an add."""
    full = sum(c for c, x in zip(coeffs, src.inputs) if x is not None and x[0] == "theta")

    def block(j):
        r0, r1 = src.span(j)
        acc = src.base_block(r0, r1, _scratch.get("acc", r1 - r0, src.cols))
        if full != 0.0:
            acc.mul_(1.0 - full)
        for c, x in zip(coeffs, src._flat):
            if x is not None and c != 0.0:
                acc.add_(x[1][r0:r1], alpha=c)
        target = out.view(src.rows, src.cols)[r0:r1]
        target.copy_(acc)
        return _range(target) if ranges is not None else None

    blocks = run_blocks(block, src.nblocks, workers)
    if ranges is not None:
        ranges.extend(blocks)
    return out
