"""Sparse merges of LoRA adapters refactorized to a LoRA rank, in one pass over the merged matrix.

A sparsifying merge (TIES, DARE, magnitude prune, breadcrumbs) of LoRA task vectors dW_i = s_i B_i A_i is a
dense, full-rank matrix M; the output adapter is its best rank-k approximation. This module computes M with
the blocked engine (:mod:`.blocked`) straight from the factors, and its rank-k factors with a
warm-started block Krylov SVD (:func:`.krylov.warm_krylov`):

- **No dense dW_i.** Each block of rows of dW_i is formed as ``B_i[r0:r1] @ A_i`` where the engine needs it
  (the same products as rows of ``B_i @ A_i``), so the inputs never exist as dense matrices.
- **The first Krylov product while M is built.** As each block of M's rows is finished, still in cache, it
  is multiplied by the start block V0 (``Y0 = M V0``) and its squared norm is added up (||M||_F^2), so M
  is not read again for either.
- **A warm start.** M is a sparsified sum of the inputs' task vectors, so its leading row space lies close
  to the span of the inputs' ``A`` rows; block Krylov from there reaches the Eckart-Young error of the flat
  spectra of these merges in two blocks, where a Gaussian start needs six (and stops by a convergence test,
  not a fixed count).

M is the same matrix as the method's reference on the dense stacked task vectors gives (the tests hold it so);
only how it is produced and factored differs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..methods.ops import mask_seed, per_input
from ..registry import Sparse
from . import blocked, blocks, krylov, speculative


def merge_to_rank(spec: Sparse, factors: list, shape: tuple[int, int], weights, params: dict, rank: int,
                  generator: torch.Generator, thresholds: Tensor | None = None, exact_below: float = 0.1,
                  out: Tensor | None = None) -> tuple[Tensor, Tensor, float]:
    """Rank-``rank`` LoRA factors ``(A, B)`` of the sparse merge ``spec`` of LoRA task vectors, and the
    relative Frobenius error of ``B @ A`` against the merged M.

    ``factors``: per input ``(s_i B_i, A_i)`` (float32, ``B @ A`` of ``shape``) or ``None`` (not adapted).
    ``generator``: the module's generator; its first draw seeds the random masks (:func:`mask_seed`, as
    the reference does), later draws pad the start block. ``thresholds``: per-input magnitude
    thresholds (granularity ``global``). Errors below ``exact_below`` are recomputed from ``M - B A``
    directly (sqrt(1 - ||BA||^2 / ||M||^2) is ~1e-7 / (2 err) off: 5e-7 at 0.1). ``out``: where to write M (float32,
    ``shape``), e.g. to look at it; by default a temporary.
    """
    # the block workers use the cores; the caller's own small steps run single-threaded, never at a barrier
    with blocked.single_threaded_caller():
        return _merge_to_rank(spec, factors, shape, weights, params, rank, generator, thresholds, exact_below, out)


def _merge_to_rank(spec, factors, shape, weights, params, rank, generator, thresholds, exact_below, out):
    seed = mask_seed(generator)
    present = [f for f in factors if f is not None]
    v0 = krylov.start_block([a for _, a in present], rank, generator=generator)
    # blocks of 4 x BLOCK elements: fewer per-block overheads than 1 x or 2 x (8 x gains nothing more)
    src = blocked.Deltas([None if f is None else ("factors", f) for f in factors], None, shape, 4 * blocked.BLOCK)
    # a thread's modules reuse one buffer for M: a fresh 64-180 MB tensor per module costs its page faults
    merged = blocks._scratch.get("merged", *shape) if out is None else out
    y0 = torch.empty(shape[0], v0.shape[1])
    squares = [0.0] * src.nblocks

    def visit(j: int, r0: int, r1: int, rows: Tensor, sq: float) -> None:
        torch.mm(rows, v0, out=y0[r0:r1])
        squares[j] = sq  # accumulated in float64 by the merge kernel

    norm_sq = None
    if spec.sparsify == "magnitude" and thresholds is None:  # merge and select in one pass
        w = weights.tolist() if isinstance(weights, Tensor) else [float(x) for x in weights]
        lam = float(params.get("lambda", 1.0))
        ks = [int(d * src.numel) for d in per_input(params["density"], src.n)]
        norm_sq = speculative.merge(src, ks, [lam * x for x in w], spec.consensus == "ties",
                                    params.get("sign", "total") != "total", merged, v0, y0)
    if norm_sq is None:  # other merges, and a missed bracket (one time in ~10^6)
        blocked.merge(spec, src, weights, params, seed=seed, thresholds=thresholds, out=merged, visit=visit)
        norm_sq = sum(squares)
    a, b, err = krylov.warm_krylov(merged, v0, rank, y0=y0, norm_sq=norm_sq)
    if 0.0 < err < exact_below:
        err = float(torch.linalg.vector_norm(merged - b @ a, dtype=torch.float64)) / norm_sq ** 0.5
    return a, b, err
