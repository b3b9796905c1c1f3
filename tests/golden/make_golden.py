"""Freeze the anchors' outputs on fixed small inputs: ``python tests/golden/make_golden.py`` writes golden.safetensors.

Each case runs an anchor once: PEFT's ``peft.utils.merge_utils`` (the flag conventions of ``peftmerge combine``),
mergekit's task-vector merge methods at the tensor level (what a YAML recipe means; mergekit 0.1.5) or a
transcription of an official algorithm (``official.py``). ``tests/merge/test_golden.py`` then holds peftmerge to
the frozen values without the anchors installed, and reruns each anchor where it is installed, so that a changed
anchor is noticed.

Random masks (DARE, DELLA) are handed to both sides as the same uniform draws (:func:`fixed_draws`): PEFT and
mergekit draw with ``torch.bernoulli`` on the global generator, peftmerge from its own streams. The inputs are
seeded Gaussians: 3 task vectors of shape (12, 20), weights (0.7, 1.3, 0.4), and a base tensor.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden.safetensors"
N, SHAPE = 3, (12, 20)
WEIGHTS = (0.7, 1.3, 0.4)


R = 2  # the rank of each input of the LoRA cases (Core Space, KnOTS): 3 x 2 = 6 <= min(SHAPE)


def factors() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """N LoRA inputs (B_i (12, R), A_i (R, 20)), the same on every machine."""
    g = torch.Generator().manual_seed(20250917)
    return [(torch.randn(SHAPE[0], R, generator=g), torch.randn(R, SHAPE[1], generator=g)) for _ in range(N)]


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(deltas (N, *SHAPE), weights (N,), base (*SHAPE)), the same on every machine."""
    g = torch.Generator().manual_seed(20240917)
    deltas = torch.randn(N, *SHAPE, generator=g)
    base = torch.randn(*SHAPE, generator=g)
    return deltas, torch.tensor(WEIGHTS), base


@contextlib.contextmanager
def fixed_draws(seed: int):
    """``torch.bernoulli(p)`` answers ``u < p`` with u from a fixed seeded stream, call after call (the same
    sequence for every anchor and for peftmerge)."""
    g = torch.Generator().manual_seed(seed)
    real = torch.bernoulli

    def bernoulli(p, *args, generator=None, **kw):
        if not isinstance(p, torch.Tensor):
            return real(p, *args, generator=generator, **kw)
        return (torch.rand(p.shape, generator=g, dtype=torch.float64) < p.double()).to(p.dtype)

    torch.bernoulli = bernoulli
    try:
        yield
    finally:
        torch.bernoulli = real


@dataclass(frozen=True)
class Case:
    """``anchor()`` and ``ours()``: the merged tensor, from :func:`inputs`."""

    name: str
    anchor: Callable[[], torch.Tensor]
    ours: Callable[[], torch.Tensor]
    source: str  # peft | mergekit | official


# --- peftmerge's side ----------------------------------------------------------------------------------------

def ours_flags(method: str, weights=None, **given) -> torch.Tensor:
    """``peftmerge combine``'s definition (the method's reference) on the fixed task vectors."""
    from peftmerge.merge import execute, registry

    deltas, w, _ = inputs()
    m = registry.get(method)
    params = m.resolve(given, N)
    return execute.dense(m, deltas, w if weights is None else weights, params,
                         registry.Context("m", torch.Generator().manual_seed(7)))


def ours_space(method: str, space: str, **given) -> torch.Tensor:
    """``peftmerge combine --space SPACE``'s merge of the fixed LoRA inputs (weights 1: the official code's single
    scaling coefficient), B @ A of its factors."""
    from peftmerge.merge import execute, registry

    m = registry.get(method)
    params = m.resolve({**given, "space": space}, N)
    a, b, _ = execute.in_space(m, space, factors(), SHAPE, torch.ones(N), params, None,
                               registry.Context("m", torch.Generator().manual_seed(7)))
    return b @ a


def dare_masks_from_ours(density: float) -> list[torch.Tensor]:
    """The masks peftmerge draws for DARE on the fixed inputs (module generator seeded 7), to hand PEFT."""
    from peftmerge.merge.methods import ops

    deltas, _, _ = inputs()
    return list(ops.bernoulli_mask(deltas, density, torch.Generator().manual_seed(7)).float())


def ours_recipe(method: str, shared: dict, per_model: dict | None = None, draws: int | None = None) -> torch.Tensor:
    """What a YAML recipe of mergekit's ``method`` means in peftmerge (:mod:`peftmerge.merge.mergekit_methods`):
    the merged tensor theta_0 + dW, weights and per-model parameters one per input."""
    from peftmerge.merge import mergekit_methods as mk

    deltas, w, base = inputs()
    spec = mk.METHODS[method]
    p = {k.name: k.default for k in spec.keys if k.name != "weight"}
    p.update(shared)
    for k in spec.keys:
        if k.per_model and k.name != "weight":
            p[k.name] = (per_model or {}).get(k.name, [p[k.name]] * N)
    with fixed_draws(draws) if draws is not None else contextlib.nullcontext():
        return base + mk.merge_delta(spec, deltas.clone(), w.tolist(), p)


# --- the anchors ----------------------------------------------------------------------------------------------

def peft_merge(fn: str, *args, masks: list[torch.Tensor] | None = None) -> torch.Tensor:
    from peft.utils import merge_utils

    deltas, w, _ = inputs()
    real = merge_utils.torch.bernoulli
    if masks is not None:
        it = iter(masks)
        merge_utils.torch.bernoulli = lambda probs: next(it)
    try:
        return getattr(merge_utils, fn)(list(deltas), w, *args)
    finally:
        merge_utils.torch.bernoulli = real


def mergekit_merge(method: str, shared: dict, per_model: dict | None = None, draws: int | None = None) -> torch.Tensor:
    """mergekit 0.1.5's ``merge_group`` of one tensor: the base and the three fine-tuned tensors theta_0 + dW_i."""
    from mergekit.merge_methods.base import ParameterScope, TensorEntry, TensorGroup
    from mergekit.merge_methods.registry import get

    deltas, w, base = inputs()
    m = get(method)
    group = TensorGroup([TensorEntry("base", base.clone(), is_base=True)] +
                        [TensorEntry(i, base + deltas[i]) for i in range(N)])
    params = {s.name: s.default for s in m.spec.parameters if s.default is not MISSING}
    params.update(shared)
    params["weight"] = {i: float(w[i]) for i in range(N)}
    for s in m.spec.parameters:  # per-model parameters: one value per input, by the input's id
        if s.name != "weight" and s.scope != ParameterScope.SHARED:
            values = (per_model or {}).get(s.name, [params.get(s.name)] * N)
            params[s.name] = {i: values[i] for i in range(N)}
    with fixed_draws(draws) if draws is not None else contextlib.nullcontext():
        return m.merge_group(group, **params).float()


def official_flags(fn: str, **kw) -> torch.Tensor:
    from golden import official

    deltas, w, _ = inputs()
    if fn == "breadcrumbs":
        masked = torch.stack([official.breadcrumbs_mask(d, kw["density"], kw["gamma"]) for d in deltas])
        return (w[:, None, None] * masked).sum(0)
    if fn == "breadcrumbs_ties":
        from peft.utils import merge_utils

        masked = torch.stack([official.breadcrumbs_mask(d, kw["density"], kw["gamma"]) for d in deltas])
        return merge_utils.disjoint_merge(w[:, None, None] * masked,
                                          merge_utils.calculate_majority_sign_mask(masked, "total"))
    if fn == "pcb":
        return official.pcb(deltas.reshape(N, -1), kw["density"]).reshape(SHAPE)
    if fn in ("core_space", "knots"):
        return getattr(official, fn)(factors(), **kw)
    if fn == "wudi":
        return official.wudi(deltas, **kw)
    return getattr(official, fn)(deltas, w)


# --- the cases ------------------------------------------------------------------------------------------------

def cases() -> list[Case]:
    ones = torch.ones(N)
    out = [
        Case("peft/task_arithmetic", lambda: peft_merge("task_arithmetic"), lambda: ours_flags("task_arithmetic"),
             "peft"),
        Case("peft/magnitude_prune_0.3", lambda: peft_merge("magnitude_prune", 0.3),
             lambda: ours_flags("magnitude_prune", density=0.3), "peft"),
    ]
    for density in (0.2, 0.5):
        for sign in ("total", "frequency"):
            out.append(Case(f"peft/ties_{density}_{sign}", lambda d=density, s=sign: peft_merge("ties", d, s),
                            lambda d=density, s=sign: ours_flags("ties", density=d, sign=s), "peft"))
    for name in ("dare_linear", "dare_ties"):
        out.append(Case(f"peft/{name}_0.3", lambda n=name: peft_merge(n, 0.3, masks=dare_masks_from_ours(0.3)),
                        lambda n=name: ours_flags(n, density=0.3), "peft"))
    out += [
        Case("official/breadcrumbs", lambda: official_flags("breadcrumbs", density=0.3, gamma=0.1),
             lambda: ours_flags("breadcrumbs", density=0.3, gamma=0.1), "official"),
        Case("official/breadcrumbs_ties", lambda: official_flags("breadcrumbs_ties", density=0.3, gamma=0.1),
             lambda: ours_flags("breadcrumbs_ties", density=0.3, gamma=0.1), "official"),
        Case("official/pcb", lambda: official_flags("pcb", density=0.2),
             lambda: ours_flags("pcb", ones, density=0.2), "official"),
        Case("official/tsv", lambda: official_flags("tsv"), lambda: ours_flags("tsv"), "official"),
        Case("official/iso_c", lambda: official_flags("iso_c"), lambda: ours_flags("iso_c"), "official"),
        Case("official/wudi", lambda: official_flags("wudi"), lambda: ours_flags("wudi", ones), "official"),
        Case("official/wudi_lr0.01_100", lambda: official_flags("wudi", lr=0.01, iter_num=100),
             lambda: ours_flags("wudi", ones, learning_rate=0.01, steps=100), "official"),
        Case("official/core_task_arithmetic_0.7", lambda: official_flags("core_space", merge="sum", scale=0.7),
             lambda: ours_space("task_arithmetic", "core", **{"lambda": 0.7}), "official"),
        Case("official/core_tsv", lambda: official_flags("core_space", merge="tsv"), lambda: ours_space("tsv", "core"),
             "official"),
        Case("official/knots_task_arithmetic", lambda: official_flags("knots", merge="sum"),
             lambda: ours_space("task_arithmetic", "knots"), "official"),
    ]
    # TIES: the official top-k (kthvalue, >=) keeps int(d k) + 1 of d entries, peftmerge int(d density) (PEFT's):
    # the cores hold 36 entries: top_k 0.2 keeps 8 = int(36 * 0.23), 0.5 keeps 19 = int(36 * 0.53); KnOTS' rows
    # (6 x 20) 120 entries: 0.2 keeps 25 = int(120 * 0.21).
    for space, official_k, density in (("core", 0.2, 0.23), ("knots", 0.2, 0.21), ("core", 0.5, 0.53)):
        fn = "core_space" if space == "core" else "knots"
        out.append(Case(f"official/{space}_ties_{official_k}", lambda f=fn, k=official_k: official_flags(
            f, merge="ties", top_k=k, scale=1.3), lambda s=space, d=density: ours_space(
            "ties", s, density=d, **{"lambda": 1.3}), "official"))
    recipes = [
        ("task_arithmetic", {"lambda": 0.8}, None, None),
        ("ties", {}, {"density": [0.3, 0.5, 0.2]}, None),
        ("dare_ties", {}, {"density": [0.3, 0.5, 0.2]}, 11),
        ("dare_linear", {"rescale": False}, {"density": [0.4, 0.4, 0.4]}, 12),
        ("breadcrumbs", {}, {"density": [0.5, 0.5, 0.5], "gamma": [0.05, 0.05, 0.05]}, None),
        ("breadcrumbs_ties", {"normalize": True}, {"density": [0.5, 0.4, 0.3], "gamma": [0.1, 0.1, 0.1]}, None),
        ("della", {"lambda": 1.1}, {"density": [0.6, 0.6, 0.6], "epsilon": [0.1, 0.1, 0.1]}, 13),
        ("della_linear", {}, {"density": [0.5, 0.7, 0.6], "epsilon": [0.2, 0.1, 0.15]}, 14),
    ]
    for method, shared, per_model, draws in recipes:
        out.append(Case(f"mergekit/{method}", lambda a=(method, shared, per_model, draws): mergekit_merge(*a),
                        lambda a=(method, shared, per_model, draws): ours_recipe(*a), "mergekit"))
    return out


def versions() -> dict:
    from importlib.metadata import version

    return {pkg: version(pkg) for pkg in ("torch", "peft", "mergekit")}


def main() -> None:
    from safetensors.torch import save_file

    sys.path.insert(0, str(HERE.parent))  # `golden` as a package, as the tests import it
    frozen = {c.name: c.anchor().contiguous() for c in cases()}
    save_file(frozen, str(GOLDEN), metadata={"anchors": json.dumps(versions()),
                                             "sources": json.dumps({c.name: c.source for c in cases()})})
    print(f"{len(frozen)} cases frozen into {GOLDEN} ({json.dumps(versions())})")


if __name__ == "__main__":
    main()
