"""Rank-k factors of a dense merged dW: block Krylov SVD, warm-started from the inputs' LoRA factors.

Returns LoRA factors ``(A, B)`` with ``B @ A`` the rank-k approximation and the singular values split evenly
(:func:`peftmerge.merge.methods.lowrank.split`), and the relative error of the approximation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..methods.lowrank import split
from .blocks import run_blocks


def randomized_svd(m: Tensor, rank: int, *, oversample: int = 8,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, float]:
    """Rank-``rank`` factors ``(A, B)`` of dense ``m`` and their relative error: :func:`warm_krylov` (block
    Krylov, Musco & Musco 2015) from a seeded Gaussian block of ``rank + oversample`` columns, for merges
    whose inputs give no better start (e.g. PCB)."""
    width = min(rank + oversample, m.shape[1])
    v0 = torch.linalg.qr(torch.randn(m.shape[1], width, generator=generator, dtype=m.dtype)).Q
    return warm_krylov(m, v0, rank)


def start_block(a_factors: list[Tensor], rank: int, *, oversample: int = 8,
                generator: torch.Generator | None = None) -> Tensor:
    """An orthonormal (d_in, p) start block for :func:`warm_krylov`: the span of the inputs' LoRA ``A`` rows
    (where the row space of a merge of their task vectors concentrates), padded with seeded Gaussian columns
    to at least ``rank + oversample``."""
    a = torch.cat(a_factors, dim=0).T  # (d_in, sum of the input ranks)
    width = min(max(a.shape[1], rank + oversample), a.shape[0])
    if width > a.shape[1]:
        a = torch.cat([a, torch.randn(a.shape[0], width - a.shape[1], generator=generator, dtype=a.dtype)], dim=1)
    return torch.linalg.qr(a[:, :width]).Q


def _extend(basis: Tensor, z: Tensor) -> Tensor:
    """An orthonormal basis of the part of ``z``'s span outside ``basis``: block Gram-Schmidt twice on unit
    columns, an SVD that drops directions below 1e-5 (rounding: a QR would turn them into arbitrary columns
    that are not orthogonal to ``basis``, as when ``m`` has lower rank than the basis), then once more
    Gram-Schmidt and QR. No columns: ``z`` lies in span(basis)."""
    z = z / z.norm(dim=0).clamp(min=torch.finfo(z.dtype).tiny)
    for _ in range(2):
        z = z - basis @ (basis.T @ z)
    u, s, _ = torch.linalg.svd(z, full_matrices=False)
    u = u[:, s > 1e-5]
    return torch.linalg.qr(u - basis @ (basis.T @ u)).Q


def warm_krylov(m: Tensor, v0: Tensor, rank: int, *, y0: Tensor | None = None, norm_sq: float | None = None,
                tol: float = 1e-7, oversample: int = 8, max_width: int | None = None) -> tuple[Tensor, Tensor, float]:
    """Rank-``rank`` factors ``(A, B)`` of dense ``m`` and the relative error ||m - BA||_F / ||m||_F, by block
    Krylov iteration (Musco & Musco 2015, Alg. 2) started from the orthonormal block ``v0`` (d_in, p), with
    a stopping rule instead of a fixed number of steps.

    The right basis grows as V = [v0, m^T u_1, m^T u_2, ...], u_t the top ``rank + oversample`` left Ritz
    vectors of the previous step (each block orthonormalised against the basis; with u_t spanning
    m V_t this is block Krylov on m^T m, narrowed to the directions that matter); the approximation is the best
    rank-k one of m with rows in span(V): the top-k SVD of Y = m V (Rayleigh-Ritz), so its error
    sqrt(1 - sum_k s_k(Y)^2 / ||m||^2) is known at every step. Started from the inputs' ``A`` rows
    (:func:`start_block`), a TIES/DARE merge of LoRA task vectors reaches its Eckart-Young error to ~1e-8 in
    two steps, where a Gaussian start needs six. Stops when the error stopped decreasing: the last decrease,
    or the decrease still to come extrapolated geometrically from the last two (Aitken), is below ``tol``.
    Past ``max_width`` basis columns (default: half the smaller dimension) the exact SVD is used instead.

    ``y0``: ``m @ v0`` if already computed (e.g. while ``m`` was built); ``norm_sq``: ||m||_F^2 if known.
    """
    d_out, d_in = m.shape
    k = min(rank, d_out, d_in)
    w = min(k + oversample, v0.shape[1])
    max_width = max_width if max_width is not None else min(d_out, d_in) // 2
    norm_sq = float(m.square().sum(dim=-1).double().sum()) if norm_sq is None else norm_sq  # row sums: accurate
    if norm_sq == 0.0:
        return torch.zeros(k, d_in, dtype=m.dtype), torch.zeros(d_out, k, dtype=m.dtype), 0.0
    v, y = v0, (products(m, v0) if y0 is None else y0)
    errs = []
    while True:
        lam, coef = torch.linalg.eigh(y.T.double() @ y.double())  # Ritz values^2, ascending
        errs.append(max(0.0, 1.0 - float(lam[-k:].sum()) / norm_sq) ** 0.5)
        if _converged(errs, tol) or v.shape[1] + w > max_width:
            break
        top = y @ coef[:, -w:].to(y.dtype)  # the top-w left Ritz vectors, unnormalised
        z = _extend(v, products(m, top, transpose=True))
        if z.shape[1] == 0:  # span(V) is invariant: m's rows lie in it, the approximation is exact
            errs.append(errs[-1])
            break
        v, y = torch.cat([v, z], dim=1), torch.cat([y, products(m, z)], dim=1)
    if not _converged(errs, tol):  # the basis would cover much of m: the exact SVD costs about as much
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return (*split(u[:, :k], s[:k], vh[:k]), _lost(s[:k], norm_sq))
    q, r = torch.linalg.qr(y)
    u, s, wh = torch.linalg.svd(r)
    a, b = split(q @ u[:, :k], s[:k], wh[:k] @ v.T)
    return a, b, _lost(s[:k], norm_sq)


def products(m: Tensor, x: Tensor, transpose: bool = False, chunk: int = 512) -> Tensor:
    """``m @ x`` (or ``m.T @ x``) by blocks of ``chunk`` rows of m on the block worker threads (each torch
    single-threaded, :func:`blocks.run_blocks`): on shared cores a threaded GEMM waits at a barrier for
    whichever thread was descheduled; blocks taken from a queue keep both cores busy instead."""
    rows = m.shape[0]
    spans = [(r, min(r + chunk, rows)) for r in range(0, rows, chunk)]
    if not transpose:
        out = torch.empty(rows, x.shape[1], dtype=m.dtype)
        run_blocks(lambda j: torch.mm(m[spans[j][0]:spans[j][1]], x, out=out[spans[j][0]:spans[j][1]]), len(spans))
        return out
    xt = x.T.contiguous()  # (x^T m)^T: a row-major product, faster than m^T x on a transposed view
    parts = run_blocks(lambda j: torch.mm(xt[:, spans[j][0]:spans[j][1]], m[spans[j][0]:spans[j][1]]), len(spans))
    return (torch.stack(parts).sum(dim=0) if len(parts) > 1 else parts[0]).T


def _lost(s: Tensor, norm_sq: float) -> float:
    """sqrt(1 - sum s^2 / ||m||^2): the relative error of a projection of m keeping singular values s."""
    return max(0.0, 1.0 - float(s.double().square().sum()) / norm_sq) ** 0.5


def _converged(errs: list[float], tol: float) -> bool:
    """The error stopped decreasing: its last decrease, or the geometric tail the last two predict, <= tol."""
    if len(errs) < 2:
        return False
    last = errs[-2] - errs[-1]
    if last <= tol:
        return True
    if len(errs) < 3:
        return False
    before = errs[-3] - errs[-2]
    ratio = last / before if before > 0 else 1.0
    return ratio < 1.0 and last * ratio / (1.0 - ratio) <= tol
