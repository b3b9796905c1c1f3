"""The sparsify x consensus merges (TIES, DARE, Model Breadcrumbs, magnitude prune), evaluated in row blocks.

Same definitions as the reference compositions in :mod:`peftmerge.merge.ops` (the tests hold them equal),
computed differently for speed:

- **Row blocks.** Each merge is a chain of ~30 elementwise steps. Over a whole (32000, 1024) tensor every
  step streams it through memory; over blocks of ``BLOCK`` elements the chain runs in the CPU cache. Task
  vectors of full checkpoints are formed block by block (theta_i - theta_0) and never stored whole.
- **Float masks.** Masks are 0/1 float32 (or folded into ``hardshrink``), never bool: boolean tensors take
  4-5x longer per element in torch's CPU kernels.
- **Threads without barriers** (:mod:`peftmerge.merge.blocks`). Blocks go to ``torch.get_num_threads()`` worker threads that each run torch
  single-threaded. On shared cores this beats torch's own OpenMP split of every op, which waits at a
  barrier for a descheduled thread after each of the ~30 steps.
- **Exact top-k by radix select** (TIES trim, :mod:`peftmerge.merge.radix`): two histogram passes over the 31 magnitude bits of
  float32 |dW| (``bincount`` of the high 15 bits, then of the low 16 inside the chosen bucket) give the
  k-th largest magnitude exactly, instead of a serial quickselect. Entries tied with it are kept in index
  order up to exactly k, as :func:`ops.magnitude_mask` does.
- **DARE masks** are drawn per block of rows from a generator seeded with (the module's seed, input,
  block), so they do not depend on the thread count; :func:`ops.bernoulli_mask` draws the same stream.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from .blocks import BLOCK, Deltas, _per_input, _scratch, run_blocks, single_threaded_caller  # noqa: F401
from .radix import Cut, topk_cuts


@dataclass(frozen=True)
class Sparse:
    """A merge as mergekit decomposes it: a sparsifier, then a consensus over the inputs.

    ``sparsify``: ``"magnitude"`` (keep the top ``density`` of each |dW_i|, TIES' trim), ``"random"``
    (DARE: keep with probability ``density``, rescale by 1/density), ``"rows"`` (Model Breadcrumbs: per row
    drop the top ``gamma``, keep the next ``density``) or ``"none"``.
    ``consensus``: ``"sum"`` (sum_i w_i dW_i) or ``"ties"`` (elect sign, disjoint mean).
    """

    sparsify: str
    consensus: str


@functools.lru_cache(maxsize=256)
def _below(t: float) -> float:
    """The largest float32 below ``t``: hardshrink keeps |x| > _below(t), i.e. |x| >= t."""
    return float(torch.nextafter(torch.tensor(t), torch.tensor(float("-inf"))))


# --- one block of the merge --------------------------------------------------------------------------------

def _trim(x: Tensor, cut: Cut | None, r0: int, cols: int, out: Tensor) -> Tensor:
    """x with all but the cut's kept entries zeroed (TIES' trim), into ``out``."""
    if cut is None:
        return x
    start, end = r0 * cols, r0 * cols + x.numel()
    if cut.tie_end <= start:  # past the kept ties: strictly above t
        return torch.hardshrink(x, cut.t, out=out) if cut.t != float("inf") else out.zero_()
    torch.hardshrink(x, _below(cut.t), out=out)
    if cut.tie_end < end:  # the block where kept ties end: zero the later ties
        flat = out.view(-1)
        tail = flat[cut.tie_end - start:]
        tail.masked_fill_(tail.abs() == cut.t, 0.0)
    return out


def _drop(x: Tensor, density: float, seed: int, out: Tensor) -> Tensor:
    """DARE: keep each entry with probability ``density``, rescaled by 1/density, into ``out`` (not ``x``)."""
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed), out=out)
    return torch.lt(u, density, out=u).mul_(x).mul_(1.0 / density)


def mask_seed(generator: torch.Generator | None) -> int:
    """The seed of a module's DARE masks: the first draw of its generator (the global one if None)."""
    return int(torch.randint(0, 1 << 62, (1,), generator=generator))


def block_seed(seed: int, i: int, j: int) -> int:
    """The seed of input i's DARE mask in block j (a fixed mix, so any thread draws the same stream)."""
    return (seed * 1_000_003 + i * 7_919 + j * 104_729) % (1 << 63)


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


def _sparsify(spec: Sparse, x: Tensor, i: int, r0: int, j: int, src: Deltas, params: dict, state: dict,
              out: Tensor, spare: Tensor) -> Tensor:
    """Input i's sparsified rows (in ``out``, which may be ``x``'s own buffer, or in ``spare``)."""
    if spec.sparsify == "magnitude":
        return _trim(x, state["cuts"][i], r0, src.cols, out)
    if spec.sparsify == "random":
        d = state["density"][i]
        if d >= 1.0:
            return x
        ms = src.mask_step  # masks are drawn per block of BLOCK elements, whatever the block size here
        for s0 in range(0, x.shape[0], ms):
            _drop(x[s0:s0 + ms], d, block_seed(state["seed"], i, (r0 + s0) // ms), spare[s0:s0 + ms])
        return spare
    if spec.sparsify == "rows":
        mask = crumbs_mask(x.abs(), state["density"][i], params["gamma"])
        return torch.mul(x, mask, out=out)
    return x


def _merge_block(spec: Sparse, src: Deltas, j: int, weights: list[float], lam: float, params: dict, state: dict,
                 out: Tensor, check: bool = False, visit=None) -> tuple[float, float] | None:
    r0, r1 = src.span(j)
    rows, cols = r1 - r0, src.cols
    base_f = src.base_block(r0, r1, _scratch.get("base", rows, cols)) if src.base is not None else None
    xs = []
    for i in range(src.n):
        buf = _scratch.get(("x", i), rows, cols)
        x = src.get(i, r0, r1, buf, base_f)
        if x is not None:
            xs.append((i, _sparsify(spec, x, i, r0, j, src, params, state, buf, _scratch.get(("r", i), rows, cols))))
    target = out.view(src.rows, cols)[r0:r1]
    combine_block(spec, xs, weights, lam, params, target, base_f)
    if visit is not None:  # while the block is in cache
        visit(j, r0, r1, target)
    return _range(target) if check else None


def combine_block(spec: Sparse, xs: list, weights: list[float], lam: float, params: dict, target: Tensor,
                  base_f: Tensor | None = None) -> None:
    """``target`` = (base_f +) lambda * consensus of the sparsified inputs ``xs`` ([(input, values)], all of
    ``target``'s shape, float32; their buffers may be overwritten)."""
    rows, cols = target.shape
    direct = base_f is None and lam == 1.0 and target.dtype == torch.float32  # the result goes straight to out
    acc = target if direct else _scratch.get("acc", rows, cols)
    if not xs:
        acc.zero_()
    elif spec.consensus == "sum":
        torch.mul(xs[0][1], weights[xs[0][0]], out=acc)
        for i, x in xs[1:]:
            acc.add_(x, alpha=weights[i])
    else:
        _ties_block(xs, weights, params.get("sign", "total"), acc, _scratch.get("sign", rows, cols),
                    _scratch.get("count", rows, cols), _scratch.get("tmp", rows, cols),
                    _scratch.get("sum", rows, cols))
    if direct:
        return
    if base_f is None:  # the merged task vector itself
        target.copy_(acc.mul_(lam))
    else:  # theta_0 + lambda * merged, cast to the output dtype on the copy
        target.copy_(torch.add(base_f, acc, alpha=lam, out=acc))


def _range(x: Tensor) -> tuple[float, float] | None:
    lo, hi = torch.aminmax(x)
    return float(lo), float(hi)


def _ties_block(xs, weights, sign: str, out: Tensor, s: Tensor, count: Tensor, tmp: Tensor, acc: Tensor) -> None:
    """TIES' elect + disjoint mean on one block, in float arithmetic (see :func:`ops.elect_sign`), into ``out``.

    s = +1 where the vote sum_i x_i (or sum_i sign x_i) is >= 0, else -1; e_i = relu(s x_i) is |x_i| where
    x_i agrees with s and 0 elsewhere (zeros never agree), so the mean is s * sum_i w_i e_i / #{e_i > 0}.
    """
    if sign == "total":
        torch.add(xs[0][1], xs[1][1], out=s) if len(xs) > 1 else s.copy_(xs[0][1])
        for _, x in xs[2:]:
            s.add_(x)
    else:
        torch.sign(xs[0][1], out=s)
        for _, x in xs[1:]:
            s.add_(torch.sign(x, out=tmp))
    # +-1 with the vote's sign; a vote of +0.0 (a sum that cancels exactly) gives +1 as ``>= 0`` does, and
    # a vote of -0.0 only arises where every input is zero, where the mean is 0 either way
    torch.copysign(_scratch.ones(*s.shape), s, out=s)
    for n, (i, x) in enumerate(xs):
        e = torch.mul(x, s, out=tmp).relu_()
        if n == 0:
            torch.mul(e, weights[i], out=acc)
            torch.gt(e, 0, out=count)
        else:
            acc.add_(e, alpha=weights[i])
            count.add_(torch.gt(e, 0, out=e))
    torch.div(acc.mul_(s), count.clamp_(min=1.0), out=out)


# --- the merge -----------------------------------------------------------------------------------------------

def merge(spec: Sparse, src: Deltas, weights, params: dict, *, seed: int = 0, thresholds: Tensor | None = None,
          out: Tensor | None = None, workers: int | None = None, ranges: list | None = None, visit=None) -> Tensor:
    """``lambda * consensus(sparsify(dW_1..n))`` of one tensor; with ``src.base`` and ``out`` given, writes
    ``theta_0 + that`` into ``out`` (any dtype, the tensor's shape) and returns it.

    ``visit(j, r0, r1, rows)``: called on a worker thread with each block's finished output rows [r0, r1)
    (a (r1 - r0, cols) view of ``out``), while they are in cache (e.g. to multiply them by a block of vectors).
    ``thresholds`` (per input, from :func:`ops.global_thresholds`): trim to |x| >= t_i instead of top-k.
    ``seed``: DARE's mask seed for this tensor (see :func:`block_seed`). ``ranges``: a list that gets the
    (min, max) of each block of ``out`` (NaN propagates), for a finiteness check without another pass.
    """
    n = src.n
    w = weights.tolist() if isinstance(weights, Tensor) else [float(x) for x in weights]
    state: dict = {"seed": int(seed)}
    if spec.sparsify in ("random", "rows", "magnitude"):
        state["density"] = _per_input(params["density"], n)
    if spec.sparsify == "magnitude":
        if thresholds is not None:
            state["cuts"] = [Cut(float(t), src.numel) for t in thresholds]
        else:
            ks = [int(d * src.numel) for d in state["density"]]
            state["cuts"] = topk_cuts(src, ks, workers)
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
