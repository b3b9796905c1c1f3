"""Probe routing: a small classifier from the base model's pooled hidden state to the task.

In the spirit of Twin-Merging (Lu et al. 2024, arXiv:2406.15479) and X-LoRA (Buehler & Buehler 2024,
arXiv:2402.07148) routers, but trained in one cheap pass: the embeddings of each adapter's labelled
examples are standardised (mean/std stored) and a logistic regression (``hidden`` = 0) or a
1-hidden-layer MLP (``hidden`` > 0, GELU) is fitted with Adam on the class-balanced cross-entropy (each task
weighs the same however many examples it has), on seeded minibatches of ``batch_size`` rows (all rows in every
step when there are fewer: full-batch)

    logits = W2 gelu(W1 z + b1) + b2   (or W z + b),   z = (emb - mean) / std

Routing: top-k of the logits, p = softmax(logits_topk / T); abstain where the top softmax probability
(at T = 1) is under ``abstain``. Parameters: ``hidden`` (256), ``steps`` (500), ``batch_size`` (256), ``lr``
(0.003), ``weight_decay`` (1e-2), ``seed`` (0), plus ``top_k`` (1), ``temperature`` (1), ``abstain``, ``layer`` (0).

Minibatches keep the fit's cost fixed however many examples there are: full-batch, 500 steps over the
37,905 examples of the MiniLM benchmark's four tasks (20,000 at most per task) take minutes on 2 cores; 500
steps of 256 rows are 3.4 passes, and route the same test queries as well (SmolLM2 layer-0 embeddings, first
300 test rows per task: 0.988 at 256 rows a step, 0.989 at 512 and 1,024).

The defaults come from routing the real test splits of sst2/agnews/rte/cola with MiniLM (2,000 train inputs
per task; docs/results.md, "Router settings"): the first layer's input (layer 0) routes
as well as deeper layers (0.957 vs 0.960 at layer 1 and 0.80 at the last) at almost no cost, and the MLP
adds about a point over logistic regression.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import Param
from .centroid import check_examples
from .registry import ABSTAIN, PAIRS, TEMPERATURE, TOP_K, BuildContext, register

PARAMS = (TOP_K(1), TEMPERATURE(1.0), ABSTAIN,
          Param("layer", 0, "hidden state pooled for the query embedding (0 = the first layer's input: token, "
                "position and token-type embeddings; -1 = last)"), PAIRS,
          Param("hidden", 256, "hidden units of the MLP (0 = logistic regression)", low=0),
          Param("steps", 500, "Adam steps", low=1),
          Param("batch_size", 256, "rows per Adam step (all rows when there are fewer)", low=1),
          Param("lr", 0.003, "Adam learning rate", low=0.0, low_open=True),
          Param("weight_decay", 1e-2, "L2 penalty", low=0.0),
          Param("seed", 0, "initialisation seed", low=0))


def _mlp(tensors: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    if "w2" in tensors:
        z = F.gelu(F.linear(z, tensors["w1"], tensors["b1"]))
        return F.linear(z, tensors["w2"], tensors["b2"])
    return F.linear(z, tensors["w1"], tensors["b1"])


def probe_logits(tensors: dict[str, torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
    return _mlp(tensors, (emb - tensors["mean"]) / tensors["std"])


def probe_scores(tensors: dict[str, torch.Tensor], emb: torch.Tensor, params: dict):
    """(logits (n, E), confidence = top softmax probability (n,))."""
    logits = probe_logits(tensors, emb)
    return logits, torch.softmax(logits, dim=1).max(dim=1).values


def fit_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, params: dict) -> dict[str, torch.Tensor]:
    """Fit the probe on embeddings ``x`` (n, d) with labels ``y`` (n,)."""
    gen = torch.Generator().manual_seed(int(params["seed"]))
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp(min=1e-6)
    d, h = x.shape[1], int(params["hidden"])
    shapes = {"w1": (h or n_classes, d), "b1": (h or n_classes,)}
    if h:
        shapes.update(w2=(n_classes, h), b2=(n_classes,))
    fan_in = {"w1": d, "b1": d, "w2": h, "b2": h}
    weights = {k: ((torch.rand(s, generator=gen) * 2 - 1) / fan_in[k] ** 0.5).requires_grad_()
               for k, s in shapes.items()}
    counts = torch.bincount(y, minlength=n_classes).float()
    balance = counts.sum() / (n_classes * counts.clamp(min=1))  # every task weighs the same, however many examples
    opt = torch.optim.AdamW(weights.values(), lr=float(params["lr"]), weight_decay=float(params["weight_decay"]))
    z = (x - mean) / std
    batch, order, at = int(params.get("batch_size") or len(z)), None, 0
    with torch.enable_grad():
        for _ in range(int(params["steps"])):
            zb, yb = z, y
            if len(z) > batch:  # seeded minibatches, each row once per pass
                if order is None or at + batch > len(z):
                    order, at = torch.randperm(len(z), generator=gen), 0
                idx = order[at:at + batch]
                at += batch
                zb, yb = z[idx], y[idx]
            opt.zero_grad()
            loss = F.cross_entropy(_mlp(weights, zb), yb, weight=balance)
            loss.backward()
            opt.step()
    return {**{k: v.detach() for k, v in weights.items()}, "mean": mean, "std": std}


@register("probe", paper="https://arxiv.org/abs/2406.15479", params=PARAMS, score=probe_scores)
def build_probe(ctx: BuildContext, params: dict) -> dict[str, torch.Tensor]:
    """The probe's weights (``w1``, ``b1`` [, ``w2``, ``b2``]) and the standardisation (``mean``, ``std``)."""
    check_examples(ctx, minimum=2)
    embs = [ctx.embed(ctx.examples[t]) for t in ctx.tasks]
    x = torch.cat(embs)
    y = torch.cat([torch.full((len(e),), i, dtype=torch.long) for i, e in enumerate(embs)])
    return fit_probe(x, y, len(ctx.tasks), params)
