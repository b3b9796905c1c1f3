"""Black-box maximisers for coefficient search: a grid over one or two parameters, and an evolution strategy.

The evolution strategy is a seeded (mu/mu_w, lambda)-ES with log-rank recombination weights (Hansen's CMA-ES
weights, isotropic, no covariance) and step-size control by the 1/5th success rule (Rechenberg). It plays the
role of the gradient-free optimisers the papers use for per-model weights: LoraHub (Huang et al., 2023,
arXiv:2307.13269; nevergrad's NGOpt, weights in [-1.5, 1.5]) and PCB-Merging (Du et al., 2024,
arXiv:2410.02396; CMA-ES over per-model lambdas).
"""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

import numpy as np


def grid(objective: Callable[[dict], float], axes: dict[str, Sequence[float]]) -> tuple[dict, float, list]:
    """Evaluate every combination of ``axes`` ({name: values}); returns (best point, best score, trace).

    Ties keep the first point in the order given, so the result does not depend on float noise."""
    names = list(axes)
    best, best_score, trace = None, -np.inf, []
    for values in itertools.product(*(axes[n] for n in names)):
        point = dict(zip(names, values))
        score = float(objective(point))
        trace.append({"point": point, "score": score})
        if score > best_score:
            best, best_score = point, score
    return best, best_score, trace


def evolve(objective: Callable[[np.ndarray], float], x0: Sequence[float], *, sigma: float = 0.3,
           population: int = 8, budget: int = 40, bounds: tuple[float, float] = (-1.5, 1.5),
           seed: int = 0) -> tuple[np.ndarray, float, list]:
    """Maximise ``objective`` from ``x0`` with at most ``budget`` evaluations (``x0`` is the first).

    Each generation samples ``population`` points m + sigma z (clipped to ``bounds``), recombines the best
    half with log-rank weights into the new mean, and scales sigma by exp((p_success - 1/5) / 0.8), where
    p_success is the fraction of offspring that beat the parent mean. Returns (best x, best score, trace).
    """
    rng = np.random.default_rng(seed)
    mean = np.clip(np.asarray(x0, dtype=float), *bounds)
    mean_score = float(objective(mean))
    trace = [{"x": mean.tolist(), "score": mean_score, "generation": 0}]
    best_x, best_score = mean.copy(), mean_score
    mu = max(1, population // 2)
    w = np.log(mu + 0.5) - np.log(np.arange(1, mu + 1))
    w /= w.sum()
    generation = 0
    while len(trace) < budget:
        generation += 1
        lam = min(population, budget - len(trace))
        xs = np.clip(mean + sigma * rng.standard_normal((lam, mean.size)), *bounds)
        scores = np.array([float(objective(x)) for x in xs])
        for x, s in zip(xs, scores):
            trace.append({"x": x.tolist(), "score": float(s), "generation": generation})
            if s > best_score:
                best_x, best_score = x.copy(), float(s)
        order = np.argsort(-scores, kind="stable")[:min(mu, lam)]
        ww = w[:len(order)] / w[:len(order)].sum()
        success = float(np.mean(scores > mean_score))
        mean = np.clip(ww @ xs[order], *bounds)
        mean_score = float(scores[order[0]])  # the parent score the next offspring must beat
        sigma *= float(np.exp((success - 0.2) / 0.8))
    return best_x, best_score, trace
