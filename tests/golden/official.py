"""The official algorithms, transcribed from their papers' published code, written out to be read.

- Model Breadcrumbs: rezazzr/breadcrumbs ``TaskVectorMiddleKeep`` (remove_first=True), per row;
- PCB-Merging: duguodong7/pcb-merging ``PCB_merge``;
- TSV-Merge (Gargiulo et al. 2025) and Iso-C (Marczak et al. 2025) as their papers publish them;
- Core Space: apanariello4/core-space-merging ``MatrixPerLayerMerger`` (``get_core_matrices``, merge_space 'core')
  with its ``ties_merging`` and ``get_tsv_delta_w``;
- KnOTS: gstoica27/KnOTS ``SVDMerger`` (``apply_svd``, ``merge``) with its ``ties_masking`` and ``masked_merge``;
- WUDI-Merging: nathanielyvo/WUDI-Merging ``get_merge_vector`` (nlp_roberta/lamassu.py), autograd and torch's Adam.

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


# --- TIES as the Core Space and KnOTS repositories write it -------------------------------------------------------

def topk_mask(m: torch.Tensor, k: float) -> torch.Tensor:
    """Per row of (n, d) ``m``: |x| >= the (d - int(d k))-th smallest |x| (kthvalue), so int(d k) + 1 entries."""
    d = m.shape[1]
    kth = m.abs().kthvalue(d - int(d * k), dim=1, keepdim=True).values
    return m.abs() >= kth


def resolve_sign(m: torch.Tensor) -> torch.Tensor:
    """sign(sum over inputs), zeros set to the sign of the total (``resolve_zero_signs`` 'majority')."""
    sign = torch.sign(m.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    return sign


def ties_merging(vectors: torch.Tensor, k: float) -> torch.Tensor:
    """``ties_merging`` (merging_type 'mean') of (n, d) ``vectors``: trim, elect, mean of the agreeing nonzeros."""
    pruned = vectors * topk_mask(vectors, k)
    sign = resolve_sign(pruned)
    selected = pruned * torch.where(sign[None] > 0, pruned > 0, pruned < 0)
    return selected.sum(dim=0) / (selected != 0).sum(dim=0).float().clamp(min=1)


def tsv_delta(tensors: list) -> torch.Tensor:
    """``get_tsv_delta_w``: the top int(rank / n) triplets of each input, orthogonalized (polar factors)."""
    n = len(tensors)
    for i, t in enumerate(tensors):
        u, s, v = torch.linalg.svd(t.double(), full_matrices=False)
        if i == 0:
            sum_u, sum_s, sum_v = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(v)
        k = int(s.shape[0] * (1 / n))
        sum_u[:, i * k:(i + 1) * k], sum_s[i * k:(i + 1) * k], sum_v[i * k:(i + 1) * k] = u[:, :k], s[:k], v[:k]
    u_u, _, v_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_v, _, v_v = torch.linalg.svd(sum_v, full_matrices=False)
    return torch.linalg.multi_dot((u_u, v_u, torch.diag(sum_s), u_v, v_v))


def core_space(factors: list, merge: str, top_k: float = 0.2, scale: float = 1.0) -> torch.Tensor:
    """Core Space merge of LoRA ``factors`` [(B_i, A_i)]: the cores from each factor's SVD aligned to the reference
    bases of the stacks (``get_core_matrices``), merged with ``merge`` ('sum', 'ties' or 'tsv'), U_B M V_A^T, times
    the scaling coefficient."""
    a_list, b_list = [a.double() for _, a in factors], [b.double() for b, _ in factors]
    vh_a_ref = torch.linalg.svd(torch.cat(a_list, dim=0), full_matrices=False)[2]
    u_b_ref = torch.linalg.svd(torch.cat(b_list, dim=1), full_matrices=False)[0]
    cores = []
    for a, b in zip(a_list, b_list):
        u_a, s_a, vh_a = torch.linalg.svd(a, full_matrices=False)
        u_b, s_b, vh_b = torch.linalg.svd(b, full_matrices=False)
        m = torch.diag(s_b) @ (vh_b @ u_a) @ torch.diag(s_a)
        cores.append((u_b_ref.T @ u_b) @ m @ (vh_a @ vh_a_ref.T))
    if merge == "sum":
        merged = torch.stack(cores).sum(dim=0)
    elif merge == "ties":
        merged = ties_merging(torch.stack([c.flatten() for c in cores]), top_k).reshape(cores[0].shape)
    else:
        merged = tsv_delta(cores)
    return (scale * (u_b_ref @ merged @ vh_a_ref)).float()


def knots(factors: list, merge: str, top_k: float = 0.2, scale: float = 1.0) -> torch.Tensor:
    """KnOTS merge of LoRA ``factors``: SVD of [dW_1 ... dW_n] (S > 1e-5), each input's rows diag(s) V_i, masked
    ('ties': ``ties_masking``; 'sum': none), ``masked_merge`` ('mean' over nonzeros for ties, 'sum' otherwise) times
    the scaling coefficient, then U @ merged."""
    deltas = [b.double() @ a.double() for b, a in factors]
    u, s, v = torch.linalg.svd(torch.cat(deltas, dim=1), full_matrices=False)
    u, v, s = u[:, s > 1e-5], v[s > 1e-5], s[s > 1e-5]
    reps = torch.stack([(torch.diag(s) @ vi).flatten() for vi in torch.split(v, deltas[0].shape[1], dim=1)])
    if merge == "ties":
        pruned_mask = topk_mask(reps, top_k)
        pruned = reps * pruned_mask
        sign = resolve_sign(pruned)
        masked = reps * (torch.where(sign[None] > 0, pruned > 0, pruned < 0) * pruned_mask)
        merged = masked.sum(dim=0) / (masked != 0).sum(dim=0).double().clamp(min=1)
    else:
        merged = reps.sum(dim=0)
    return (u @ (scale * merged).reshape(s.numel(), -1)).float()


def wudi(deltas: torch.Tensor, iter_num: int = 300, lr: float = 1e-5) -> torch.Tensor:
    """WUDI-Merging: from the sum of the task vectors, ``iter_num`` Adam steps on
    sum_i ||(tau - tau_i) tau_i^T||^2 / ||tau_i||^2, by autograd and torch.optim.Adam (float64)."""
    vectors = deltas.double()
    merging_vector = torch.nn.Parameter(torch.sum(vectors, dim=0))
    optimizer = torch.optim.Adam([merging_vector], lr=lr)
    l2_norms = torch.square(torch.norm(vectors.reshape(vectors.shape[0], -1), p=2, dim=1))
    for _ in range(iter_num):
        inner_product = torch.matmul(merging_vector.unsqueeze(0) - vectors, vectors.transpose(1, 2))
        loss = torch.sum(torch.square(inner_product) / l2_norms.unsqueeze(-1).unsqueeze(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return merging_vector.data.detach().float()
