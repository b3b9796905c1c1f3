"""Factor-space linear algebra of LoRA task vectors, exact and without forming a dense dW.

Factors are returned as LoRA ``(A, B)`` with ``B @ A`` the matrix and the singular values split evenly
(``B = U sqrt(S)``, ``A = sqrt(S) V^T``) so neither factor dominates in low precision.
"""

from __future__ import annotations

import torch
from torch import Tensor


def split(u: Tensor, s: Tensor, vh: Tensor) -> tuple[Tensor, Tensor]:
    """(A, B) = (sqrt(S) V^T, U sqrt(S)) of an SVD (U, S, V^T)."""
    root = s.sqrt()
    return root[:, None] * vh, u * root[None, :]


def sum_of_factors(bs: list[Tensor], as_: list[Tensor], shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``(B, A)`` with ``B @ A = sum_k bs[k] @ as_[k]``: the blocks concatenated, except that blocks with the same
    ``A`` (bit for bit) become one block with their ``B``'s added, and rank-one terms whose column of B or row of A
    is all zero are dropped. So an adapter minus itself is exactly zero (x - x = 0 in floating point) instead of
    rounding noise spread over twice its rank. No term left: rank-1 zero factors (PEFT needs r >= 1)."""
    blocks: list[list] = []
    for b, a in zip(bs, as_):
        same = next((blk for blk in blocks if blk[1].shape == a.shape and torch.equal(blk[1], a)), None)
        if same is None:
            blocks.append([b, a])
        else:
            same[0] = same[0] + b
    b = torch.cat([blk[0] for blk in blocks], dim=1) if blocks else torch.zeros(shape[0], 0)
    a = torch.cat([blk[1] for blk in blocks], dim=0) if blocks else torch.zeros(0, shape[1])
    keep = b.ne(0).any(dim=0) & a.ne(0).any(dim=1)
    if not bool(keep.any()):
        return torch.zeros(shape[0], 1, dtype=b.dtype), torch.zeros(1, shape[1], dtype=a.dtype)
    return (b, a) if bool(keep.all()) else (b[:, keep], a[keep])


def factor_svd(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``(U, S, Vh)`` of ``b @ a`` without forming it (b: (d_out, R), a: (R, d_in)):
    b = Q_b R_b, a^T = Q_a R_a, R_b R_a^T = u S vh  =>  b a = (Q_b u) S (vh Q_a^T). Cost O((d_out + d_in) R^2)."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    return qb @ u, s, vh @ qa.T


def truncate_factors(b: Tensor, a: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Best rank-``rank`` approximation (Eckart-Young) of ``b @ a`` without forming it.

    Returns ``(A, B, s)`` with ``s`` all singular values of ``b @ a`` (for the truncation error).

    b: (d_out, R), a: (R, d_in); :func:`factor_svd`, then keep the top ``rank``.
    """
    u, s, vh = factor_svd(b, a)
    k = min(rank, s.numel())
    a_out, b_out = split(u[:, :k], s[:k], vh[:k])
    return a_out, b_out, s


def factor_norm(b: Tensor, a: Tensor) -> float:
    """||b @ a||_F without forming it: sqrt(sum((b^T b) * (a a^T)))."""
    return float(((b.T @ b) * (a @ a.T)).sum().clamp(min=0).sqrt())
