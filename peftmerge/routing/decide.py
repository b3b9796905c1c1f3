"""The shared decision of query routers: top-k, softmax with temperature, abstain.

    idx = top-k(scores);  p = softmax(scores[idx] / T);  abstain where confidence < threshold

A row that abstains selects no adapter (the base model answers it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Decision:
    """Per query: the chosen adapters (indices into the router's adapters) and their weights."""

    indices: torch.Tensor  # (n, k) int64
    weights: torch.Tensor  # (n, k) float32, rows sum to 1 (0 where abstained)
    abstained: torch.Tensor  # (n,) bool
    confidence: torch.Tensor  # (n,) what the abstain threshold was compared with

    def rows(self) -> list[list[tuple[int, float]]]:
        """[(adapter index, weight), ...] per query, best first, empty where abstained."""
        out = []
        for i in range(self.indices.shape[0]):
            if bool(self.abstained[i]):
                out.append([])
            else:
                out.append([(int(e), float(w)) for e, w in zip(self.indices[i], self.weights[i]) if w > 0])
        return out


def decide(scores: torch.Tensor, confidence: torch.Tensor, top_k: int, temperature: float,
           abstain: float | None = None) -> Decision:
    """``scores`` (n, E) -> the top-``top_k`` adapters per row with softmax weights at ``temperature``."""
    k = min(int(top_k), scores.shape[1])
    top, idx = scores.topk(k, dim=1)  # (n, k)
    weights = torch.softmax(top / temperature, dim=1)
    abstained = torch.zeros(scores.shape[0], dtype=torch.bool)
    if abstain is not None:
        abstained = confidence < float(abstain)
        weights = weights.masked_fill(abstained[:, None], 0.0)
    return Decision(idx, weights, abstained, confidence)


def one_adapter(n: int, index: int) -> Decision:
    """Every row routed to adapter ``index`` with weight 1 (forcing one adapter)."""
    return Decision(torch.full((n, 1), index, dtype=torch.long), torch.ones(n, 1),
                    torch.zeros(n, dtype=torch.bool), torch.ones(n))
