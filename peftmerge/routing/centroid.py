"""Centroid routing: retrieve the adapters whose training inputs look most like the query.

LoraRetriever (Zhao et al. 2024, arXiv:2402.09997), simplified: each adapter i is represented by the mean
embedding c_i of a few of its training inputs (``samples`` in its ``peftmerge.json`` or ``--examples``).
Pooled LM hidden states share a large common direction, so all embeddings are first centred on the mean
m of every sample (stored as ``center``). A query q scores

    cos_i = cos(q - m, c_i - m);  top-k, p = softmax(cos_topk / T);  abstain (base model) if max cos < tau

Parameters: ``top_k`` (1), ``temperature`` (0.1), ``abstain`` tau (off), ``layer`` (pooled hidden state).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import PeftmergeError
from .registry import ABSTAIN, LAYER, PAIRS, TEMPERATURE, TOP_K, BuildContext, register


def centroid_scores(tensors: dict[str, torch.Tensor], emb: torch.Tensor, params: dict):
    """(cosine scores (n, E), confidence = best cosine (n,))."""
    q = F.normalize(emb - tensors["center"], dim=1)
    cos = q @ F.normalize(tensors["centroids"], dim=1).T
    return cos, cos.max(dim=1).values


def check_examples(ctx: BuildContext, minimum: int = 1) -> None:
    for task in ctx.tasks:
        if len(ctx.examples.get(task, [])) < minimum:
            raise PeftmergeError(f"adapter {task!r} has {len(ctx.examples.get(task, []))} example inputs (need "
                                 f">= {minimum}); add samples to its peftmerge.json or pass --examples {task}=FILE.jsonl")


@register("centroid", paper="https://arxiv.org/abs/2402.09997",
          params=(TOP_K(1), TEMPERATURE(0.1), ABSTAIN, LAYER, PAIRS), score=centroid_scores)
def build_centroid(ctx: BuildContext, params: dict) -> dict[str, torch.Tensor]:
    """``centroids`` (E, d): mean sample embedding per adapter (centred); ``center`` (d,)."""
    check_examples(ctx)
    embs = [ctx.embed(ctx.examples[t]) for t in ctx.tasks]
    center = torch.cat(embs).mean(0)
    return {"centroids": torch.stack([e.mean(0) for e in embs]) - center, "center": center}
