"""Where a merge method runs on LoRA inputs: the task vectors themselves, their Core Space, or KnOTS' space.

Every space is computed from the inputs' factors dW_i = B_i A_i (B_i: (d_out, r_i), A_i: (r_i, d_in)); no d_out x d_in
matrix per input is ever formed, and the merged update comes back as exact LoRA factors of rank <= R = sum_i r_i.

Core Space (Panariello et al., NeurIPS 2025, "Accurate and Efficient Low-Rank Model Merging in Core Space",
arXiv:2509.17786; official code apanariello4/core-space-merging, ``get_core_matrices``)::

    U_B = left singular vectors of [B_1 ... B_n]        (d_out, k_B), k_B = min(d_out, R)
    V_A = right singular vectors of [A_1; ...; A_n]    (d_in, k_A),  k_A = min(d_in, R)
    M_i = U_B^T B_i A_i V_A                            (k_B, k_A): the cores the method merges into M
    dW  = U_B M V_A^T

U_B and V_A hold every B_i and A_i exactly, so a method linear in the dW_i (task arithmetic) gives the full-space
merge exactly, and so do the rotation-invariant ones (TSV-Merge, Iso-C). The bases are the singular vectors (not any
orthonormal basis): an entrywise method (TIES, DARE) sees the cores in these coordinates, as in the official code.

KnOTS (Stoica et al., ICLR 2025, "Model Merging with SVD to Tie the KnOTS", arXiv:2410.19735; official code
gstoica27/KnOTS, ``SVDMerger.apply_svd`` and ``merge``)::

    [dW_1 ... dW_n] = U S [V_1^T ... V_n^T]            (the SVD of the m x (n d_in) concatenation; S > 0 only)
    X_i = S V_i^T                                      (k, d_in): what the method merges into X
    dW  = U X

As in the official code the merged rows are the task-specific V_i^T scaled by S (``V = diag(s) @ V``) and the
method's own scaling applies to them; with a linear method this is the full-space merge exactly. Computed from
the factors: [B_1 .. B_n] = Q R, A_i^T = Q_i R_i, so [dW_1 .. dW_n] = Q [R_1 R_1'^T .. R_n R_n'^T] diag(Q_i^T),
and the SVD of the small middle matrix (k <= R) gives U = Q u and V_i^T = vh_i Q_i^T.

Both are computed in float64; the method then runs on float32 representations, as on full-space task vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SPACES = ("full", "core", "knots")
RTOL = 1e-6  # KnOTS keeps the singular values of the concatenation above this fraction of the largest


@dataclass
class Representation:
    """What the method merges (``stack`` (n, k1, k2), float32) and how its merge maps back to dW = left @ X @ right:
    ``left`` (d_out, k1) orthonormal columns, ``right`` (k2, d_in) orthonormal rows or None (k2 = d_in)."""

    stack: Tensor
    left: Tensor
    right: Tensor | None


def _left_singular(b: Tensor) -> Tensor:
    """The left singular vectors (d, min(d, R)) of ``b`` (d, R), from its QR: b = Q R_, R_ = u s vh => Q u."""
    q, r = torch.linalg.qr(b)
    u, _, _ = torch.linalg.svd(r, full_matrices=False)
    return q @ u


def _present(factors: list) -> list[int]:
    return [i for i, f in enumerate(factors) if f is not None]


def core(factors: list, shape: tuple[int, int]) -> Representation:
    """Core Space of ``factors`` ``[(B_i, A_i) or None, ...]`` (None: the input does not adapt this module):
    the cores M_i (n, k_B, k_A), U_B and V_A^T."""
    present = _present(factors)
    b = torch.cat([factors[i][0].double() for i in present], dim=1)  # (d_out, R)
    a = torch.cat([factors[i][1].double() for i in present], dim=0)  # (R, d_in)
    u_b = _left_singular(b)  # (d_out, k_B)
    v_a = _left_singular(a.T)  # (d_in, k_A)
    stack = torch.zeros(len(factors), u_b.shape[1], v_a.shape[1], dtype=torch.float64)
    for i in present:
        bi, ai = factors[i]
        stack[i] = (u_b.T @ bi.double()) @ (ai.double() @ v_a)  # (k_B, r_i) @ (r_i, k_A)
    return Representation(stack.float(), u_b, v_a.T)


def knots(factors: list, shape: tuple[int, int]) -> Representation:
    """KnOTS' space of ``factors``: X_i = S V_i^T (n, k, d_in) and U, from the SVD of [dW_1 .. dW_n] in factor space."""
    present = _present(factors)
    q, r = torch.linalg.qr(torch.cat([factors[i][0].double() for i in present], dim=1))  # [B_i] = Q R
    blocks, bases, start = [], [], 0
    for i in present:
        ri = factors[i][0].shape[1]
        qi, rr = torch.linalg.qr(factors[i][1].double().T)  # A_i^T = Q_i R_i
        blocks.append(r[:, start:start + ri] @ rr.T)  # dW_i = Q (R[:, cols_i] R_i^T) Q_i^T
        bases.append(qi)
        start += ri
    u, s, vh = torch.linalg.svd(torch.cat(blocks, dim=1), full_matrices=False)
    keep = s > RTOL * s[0] if s.numel() and s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    u, s, vh = u[:, keep], s[keep], vh[keep]
    stack = torch.zeros(len(factors), s.numel(), shape[1], dtype=torch.float64)
    start = 0
    for i, qi in zip(present, bases):
        width = qi.shape[1]
        stack[i] = s[:, None] * (vh[:, start:start + width] @ qi.T)  # S V_i^T
        start += width
    return Representation(stack.float(), q @ u, None)


def represent(space: str, factors: list, shape: tuple[int, int]) -> Representation:
    """The inputs' representation in ``space`` (``core`` or ``knots``)."""
    return core(factors, shape) if space == "core" else knots(factors, shape)


def lift(rep: Representation, merged: Tensor, rank: int | None = None) -> tuple[Tensor, Tensor, float]:
    """LoRA factors ``(A, B)`` of dW = left @ merged @ right, its nonzero singular directions only (the top ``rank``
    where given: the optimal truncation, since left and right are orthonormal), and the relative error of the
    truncation (0 when nothing is dropped). Singular values split evenly between A and B."""
    u, s, vh = torch.linalg.svd(merged.double(), full_matrices=False)
    if rep.right is not None:  # (k, k_A) @ (k_A, d_in): orthonormal rows stay orthonormal
        vh = vh @ rep.right
    nonzero = int((s > 1e-12 * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    k = min(nonzero, rank) if rank is not None else nonzero
    if k == 0:
        d_out, d_in = rep.left.shape[0], vh.shape[1]
        return torch.zeros(1, d_in), torch.zeros(d_out, 1), 0.0
    err = float((s[k:].square().sum() / s.square().sum()).sqrt())
    root = s[:k].sqrt()
    return (root[:, None] * vh[:k]).float(), ((rep.left @ u[:, :k]) * root).float(), err


def grams(rep: Representation, given: list | None) -> list | None:
    """The Gram matrices of the layer's inputs in the representation's input coordinates: V_A^T G_i V_A in Core
    Space (its inputs are x V_A), unchanged in KnOTS' (its rows keep the layer's d_in inputs)."""
    if given is None or rep.right is None:
        return given
    v = rep.right.double()
    return [None if g is None else (v @ g.double() @ v.T).float() for g in given]
