"""mergekit's definitions of the merge methods it shares with peftmerge: what a YAML recipe means.

A YAML recipe (``--config``) means what it means to mergekit 0.1.5 (arcee-ai/mergekit; Goddard et al.,
2024, "Arcee's MergeKit", arXiv:2403.13257). Its task-vector methods are one algorithm, configured per
method as sparsifier x consensus with per-method defaults of ``normalize`` and ``rescale``::

    d_i   = sparsify(theta_i - theta_0, density_i)        # unchanged where density_i >= 1
    d_i   = d_i * ||theta_i - theta_0||_1 / ||d_i||_1     # if ``rescale`` (L1 norm of the dense vector kept)
    v_i   = w_i d_i
    keep  = sign(v_i) == sign(sum_j v_j)                  # consensus: TIES' election on the WEIGHTED vectors
    dW    = lambda * sum_i keep_i v_i / D                 # D = sum_i keep_i w_i if ``normalize`` (0 -> 1), else 1
    theta = theta_0 + dW

and ``linear`` is the weighted average of the models themselves, sum_i w_i theta_i / sum_i w_i (``normalize``,
on by default; off: the plain weighted sum). Sparsifiers, all over the whole tensor except della's:

- ``magnitude`` (ties): keep the max(1, int(density n)) largest |d|;
- ``outliers`` (breadcrumbs): drop the int(gamma n) largest, keep the next int(density n);
- ``random`` (dare): keep each entry with probability density;
- ``della`` (DELLA, Deep et al. 2024, arXiv:2406.11617): per row (dim 1), keep with probability
  density - epsilon + 2 epsilon (rank of |d| in its row - 1) / (columns - 1).

Random masks come from a generator seeded by ``seed`` and the tensor's name (mergekit draws from torch's
global generator): the same distribution, so the same expected merge, not the same draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PeftmergeError
from .methods import ops

REQUIRED = object()  # a parameter with no default (mergekit's ``weight``)


@dataclass(frozen=True)
class Key:
    """One parameter of a mergekit method: its type, default and scope (per input model, or shared)."""

    name: str
    kind: type  # float | bool | int
    default: object
    per_model: bool = False


@dataclass(frozen=True)
class Spec:
    """A mergekit method as data: sparsifier x consensus, with its defaults."""

    name: str
    paper: str
    sparsify: str | None  # magnitude | outliers | random | della | None
    ties: bool  # TIES' sign consensus
    normalize: bool
    rescale: bool

    @property
    def keys(self) -> tuple[Key, ...]:
        if self.name == "linear":
            return (Key("weight", float, REQUIRED, True), Key("normalize", bool, True), Key("seed", int, 0))
        keys = [Key("weight", float, REQUIRED, True), Key("density", float, 1.0, True),
                Key("int8_mask", bool, False), Key("normalize", bool, self.normalize),
                Key("rescale", bool, self.rescale), Key("lambda", float, 1.0), Key("seed", int, 0)]
        if self.sparsify == "outliers":
            keys.append(Key("gamma", float, 0.01, True))
        if self.sparsify == "della":
            keys.append(Key("epsilon", float, 0.15, True))
        return tuple(keys)

    @property
    def random(self) -> bool:
        return self.sparsify in ("random", "della")


METHODS = {s.name: s for s in (
    Spec("linear", "https://arxiv.org/abs/2203.05482", None, False, True, False),
    Spec("task_arithmetic", "https://arxiv.org/abs/2212.04089", None, False, False, False),
    Spec("ties", "https://arxiv.org/abs/2306.01708", "magnitude", True, True, False),
    Spec("dare_ties", "https://arxiv.org/abs/2311.03099", "random", True, False, True),
    Spec("dare_linear", "https://arxiv.org/abs/2311.03099", "random", False, False, True),
    Spec("breadcrumbs", "https://arxiv.org/abs/2312.06795", "outliers", False, False, False),
    Spec("breadcrumbs_ties", "https://arxiv.org/abs/2312.06795", "outliers", True, False, False),
    Spec("della", "https://arxiv.org/abs/2406.11617", "della", True, True, True),
    Spec("della_linear", "https://arxiv.org/abs/2406.11617", "della", False, False, True),
)}

# mergekit's other methods (0.1.5): refused, each with what to do instead.
REFUSED_METHODS = {
    "slerp": "spherical interpolation of two models",
    "nuslerp": "spherical interpolation",
    "multislerp": "spherical interpolation of many models",
    "karcher": "the Riemannian (Karcher) mean",
    "model_stock": "Model Stock's geometric interpolation",
    "sce": "SCE's variance-based selection",
    "ram": "RAM's overlap-aware rescaling",
    "ramplus_tl": "RAM+",
    "arcee_fusion": "Arcee Fusion's KL-based selection",
    "nearswap": "nearswap interpolation",
    "passthrough": "copying / stacking layers",
}

# mergekit keys peftmerge refuses: (what they do, what to do instead)
REFUSED_KEYS = {
    "slices": ("layer ranges and layer stacking", "list whole models under models"),
    "modules": ("per-module model lists", "list whole models under models"),
    "tokenizer": ("per-token embedding sources", "use tokenizer_source: base, union or a model"),
    "chat_template": ("a chat template for the output",
                      "use tokenizer_source: MODEL to take that model's tokenizer and its template"),
}


# --- sparsifiers: keep-masks (or the tensor itself where nothing is dropped) ---------------------------

# Ranks come from torch's default (unstable) sorts, as mergekit's do, so that entries tied in magnitude are
# ranked the same way by both.

def _magnitude(d: torch.Tensor, density: float) -> torch.Tensor:
    k = max(1, int(density * d.numel()))
    mask = torch.zeros(d.numel(), dtype=torch.bool)
    mask[torch.argsort(d.abs().reshape(-1), descending=True)[:k]] = True
    return mask.reshape(d.shape)


def _outliers(d: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    n = d.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)  # fewer outliers dropped where keeping `keep` needs them
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.sort(d.abs().reshape(-1)).indices[bottom:bottom + keep]] = True
    return mask.reshape(d.shape)


def _della(d: torch.Tensor, density: float, epsilon: float, generator, name: str) -> torch.Tensor:
    rows = d.unsqueeze(0) if d.dim() < 2 else d
    cols = rows.shape[1]
    if cols < 2:
        raise PeftmergeError(f"della ranks entries along dim 1, and tensor {name} has {cols} there; "
                             "use dare_ties or ties for this model")
    rank = torch.argsort(torch.argsort(rows.abs(), dim=1), dim=1).float()  # 0 .. cols - 1
    probs = (density - epsilon) + rank / (cols - 1) * (2 * epsilon)
    return torch.bernoulli(probs, generator=generator).bool().reshape(d.shape)


def sparsify(spec: Spec, d: torch.Tensor, p: dict, i: int, generator, name: str) -> torch.Tensor:
    """Input i's task vector ``d`` sparsified (and L1-rescaled where ``rescale``) as mergekit does."""
    density = p["density"][i]
    if spec.sparsify is None or density >= 1:
        return d
    if spec.sparsify == "magnitude":
        if density <= 0 or d.numel() == 0:
            return torch.zeros_like(d)
        mask = _magnitude(d, density)
    elif spec.sparsify == "outliers":
        mask = _outliers(d, density, p["gamma"][i])
    elif spec.sparsify == "random":
        mask = torch.bernoulli(torch.full_like(d, density), generator=generator).bool()
    else:
        if density <= 0:
            return torch.zeros_like(d)
        mask = _della(d, density, p["epsilon"][i], generator, name)
    kept = d * mask
    if not p["rescale"]:
        return kept
    before, after = d.abs().sum(), kept.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def check(spec: Spec, p: dict, where: str) -> None:
    """mergekit's own refusals, as one-line errors: DARE's probabilities, della's epsilon."""
    for i, density in enumerate(p.get("density", ())):
        if spec.random and density < 0:
            raise PeftmergeError(f"{where}: density {density} of input {i + 1} is a keep probability; give one "
                                 "in [0, 1]")
        if spec.sparsify == "della" and 0 < density < 1:
            eps = p["epsilon"][i]
            if density + eps >= 1 or density - eps <= 0:
                raise PeftmergeError(f"{where}: della needs density +/- epsilon inside (0, 1), got density {density} "
                                     f"and epsilon {eps} for input {i + 1}; lower epsilon")


def merge_delta(spec: Spec, deltas: torch.Tensor, weights: list[float], p: dict, generator=None,
                name: str = "") -> torch.Tensor:
    """mergekit's merged task vector of one tensor from the (n, *shape) float32 task vectors of its inputs
    (the generalized task arithmetic of every method but ``linear``)."""
    v = torch.stack([sparsify(spec, d, p, i, generator, name) for i, d in enumerate(deltas)])
    w = torch.tensor(weights, dtype=v.dtype).reshape(-1, *[1] * (v.dim() - 1))
    v.mul_(w)
    if spec.ties:
        keep = ops.elect_sign(v, "total")  # sign(v_i) == sign(sum_j v_j), zeros never agree
        merged = (v * keep).sum(dim=0)
        divisor = (w * keep).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        merged = v.sum(dim=0)
        divisor = w.sum()
        if divisor.abs() < 1e-8:
            divisor = torch.ones(())
    if p["normalize"]:
        merged = merged / divisor
    if p["lambda"] != 1:
        merged = merged * p["lambda"]
    return merged


def linear_sum(base: torch.Tensor, deltas: torch.Tensor, weights: list[float], normalize: bool,
               name: str = "") -> torch.Tensor:
    """mergekit's ``linear`` of one tensor: sum_i w_i theta_i (/ sum_i w_i), theta_i = base + deltas[i]."""
    total = sum(weights)
    if normalize and total == 0:
        raise PeftmergeError(f"linear weights sum to 0 for tensor {name}, and linear divides by their sum; "
                             "change the weights or set normalize: false")
    out = torch.zeros_like(base)
    for d, w in zip(deltas, weights):
        out.add_(base + d, alpha=w)
    return out.div_(total) if normalize else out
