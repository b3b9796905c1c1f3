"""The official algorithms, transcribed from their papers' published code, written out to be read.

- Model Breadcrumbs: rezazzr/breadcrumbs ``TaskVectorMiddleKeep`` (remove_first=True), per row;
- PCB-Merging: duguodong7/pcb-merging ``PCB_merge``;
- TSV-Merge (Gargiulo et al. 2025) and Iso-C (Marczak et al. 2025) as their papers publish them.

The parity tests compare the methods against these (and against PEFT's ``merge_utils`` and mergekit);
``make_golden.py`` freezes their outputs on fixed inputs.
"""

from __future__ import annotations

import torch


def breadcrumbs_mask(t: torch.Tensor, keep: float, remove: float) -> torch.Tensor:
    """``t`` with, per row, its top ``remove`` fraction zeroed and only the next ``keep`` fraction kept."""
    top = int(t.shape[-1] * remove)
    idx = torch.topk(t.abs(), top).indices
    mask = torch.ones(t.shape)
    mask.scatter_(t.dim() - 1, idx, 0.0)
    t = mask * t
    k = int(t.shape[-1] * keep)
    idx = torch.topk(t.abs(), k).indices
    mask = torch.zeros(t.shape)
    mask.scatter_(t.dim() - 1, idx, 1)
    return mask * t


def pcb(flat: torch.Tensor, ratio: float) -> torch.Tensor:
    """PCB's merge of (n, d) flattened task vectors with all model lambdas 1."""
    def normalize(x, dim=0):
        lo, hi = x.min(dim=dim, keepdim=True).values, x.max(dim=dim, keepdim=True).values
        return (x - lo) / (hi - lo)

    def clamp(x, min_ratio=0.0, max_ratio=0.0):
        d = x.size(1)
        s = torch.sort(x, dim=1).values
        return torch.clamp(x, s[:, int(d * min_ratio)].unsqueeze(1), s[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1))

    n = flat.shape[0]
    mags = clamp(flat.abs(), 0.0001, 0.0001)
    clamped = flat.sign() * mags
    task = torch.exp(n * normalize(mags, 1) ** 2) * torch.tanh(flat * flat.sum(dim=0))
    scale = normalize(clamp(task, 1 - ratio, 0), dim=1)
    return (clamped * scale).sum(0) / scale.sum(0).clamp(min=1e-12)


def tsv(deltas: torch.Tensor, weights: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """TSV-M as published: top min(shape)/T triplets of each task vector, concatenated, U and V replaced
    by the orthogonal factors of their SVDs (u_u @ v_u), dW = U_perp diag(S) V_perp."""
    t = deltas.shape[0]
    k = int(min(deltas.shape[1:]) / t)
    us, ss, vs = [], [], []
    for w, d in zip(weights, deltas.double()):
        u, s, v = torch.linalg.svd(w * d, full_matrices=False)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(v[:k])
    u_u, _, v_u = torch.linalg.svd(torch.cat(us, 1), full_matrices=False)
    u_v, _, v_v = torch.linalg.svd(torch.cat(vs, 0), full_matrices=False)
    return (alpha * torch.linalg.multi_dot((u_u, v_u, torch.diag(torch.cat(ss)), u_v, v_v))).float()


def iso_c(deltas: torch.Tensor, weights: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Iso-C as published: SVD of the task-vector sum, every singular value replaced by their mean."""
    u, s, v = torch.linalg.svd(torch.tensordot(weights.double(), deltas.double(), dims=1), full_matrices=False)
    return (alpha * torch.linalg.multi_dot((u, torch.diag(torch.ones_like(s) * s.mean()), v))).float()
