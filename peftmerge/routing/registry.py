"""The one registry of routers.

A router chooses, for each query (or each token), which task adapters to apply and with what weights.
Two kinds share this registry:

- *query* routers (``centroid``, ``probe``) score a pooled embedding of the whole query::

      build(ctx: BuildContext, params) -> dict[str, Tensor]          # what router.safetensors holds
      score(tensors, emb (n, d), params) -> (scores (n, E), confidence (n,))

  then one shared rule (:func:`peftmerge.routing.decide.decide`) keeps the top-k scores, turns them into
  weights with a softmax at ``temperature`` and abstains (base model) where ``confidence < abstain``;
- *token* routers (``arrow``) are data-free: ``build`` stores per-layer prototypes and the routed model
  decides per token inside each adapted layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import PeftmergeError, did_you_mean
from ..merge.registry import Param

TOP_K = lambda default: Param("top_k", default, "adapters combined per query/token", low=1)  # noqa: E731
TEMPERATURE = lambda default: Param("temperature", default, "softmax temperature of the weights",  # noqa: E731
                                    low=0.0, low_open=True)
ABSTAIN = Param("abstain", None, "confidence under which the query gets the base model (off when unset)")
LAYER = Param("layer", -1, "hidden state pooled for the query embedding (0 = token embeddings, -1 = last)")
PAIRS = Param("pairs", "segments", "a sentence pair's embedding: 'segments' = [pooled text; pooled text_pair] (a "
              "single text: [pooled text; 0]), 'joint' = the pair pooled as one sequence", choices=("segments", "joint"))


@dataclass
class BuildContext:
    """What a router may use when it is built."""

    adapters: list  # LoraAdapter, in router order
    tasks: list[str]
    examples: dict[str, list[str]] = field(default_factory=dict)  # task -> raw input texts
    embed: Callable | None = None  # list[str] -> (n, d) float32 query embeddings
    general: list = field(default_factory=list)  # LoraAdapter: GenKnowSub's general adapters (arrow)


@dataclass(frozen=True)
class Strategy:
    name: str
    paper: str
    doc: str
    params: tuple[Param, ...]
    build: Callable
    score: Callable | None = None  # query routers only
    per_token: bool = False

    def resolve(self, given: dict) -> dict:
        """Defaults filled in, values checked; an unknown parameter names the valid ones."""
        known = {p.name: p for p in self.params}
        for key, value in given.items():
            if value is not None and key not in known:
                raise PeftmergeError(f"router {self.name} takes no parameter {key!r} "
                                     f"(its parameters: {', '.join(known)})")
        out: dict[str, Any] = {}
        for p in self.params:
            v = given.get(p.name)
            out[p.name] = p.check(_number(self.name, p, v), 1) if v is not None else p.default
        return out


def _number(router: str, p: Param, v):
    """A router parameter's value checked: a finite number (a whole one where the default is), in range."""
    if p.choices is not None:
        return v
    whole = isinstance(p.default, int) and not isinstance(p.default, bool)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PeftmergeError(f"router {router}: {p.name} {v!r} is not a number; give {'a whole' if whole else 'a'} "
                             "number")
    if not math.isfinite(v):
        raise PeftmergeError(f"router {router}: {p.name} {v} is not a finite number")
    if whole and v != int(v):
        raise PeftmergeError(f"router {router}: {p.name} {v} must be a whole number")
    if p.low is not None and (v <= p.low if p.low_open else v < p.low):
        raise PeftmergeError(f"router {router}: {p.name} {v} is out of range: must be {'>' if p.low_open else '>='} "
                             f"{p.low}")
    if p.high is not None and v > p.high:
        raise PeftmergeError(f"router {router}: {p.name} {v} is out of range: must be <= {p.high}")
    return int(v) if whole else v


_REGISTRY: dict[str, Strategy] = {}


def register(name: str, *, paper: str, params: tuple[Param, ...], score: Callable | None = None,
             per_token: bool = False):
    """Decorator on a router's ``build`` function."""

    def wrap(build: Callable) -> Callable:
        import sys

        doc = (sys.modules[build.__module__].__doc__ or "").strip()
        _REGISTRY[name] = Strategy(name, paper, doc, tuple(params), build, score, per_token)
        return build

    return wrap


def _load_all() -> None:
    from . import arrow, centroid, probe  # noqa: F401  (importing registers each router)


def names() -> list[str]:
    """Every registered router name."""
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> Strategy:
    """The router called ``name``; an unknown name lists the valid ones."""
    _load_all()
    if name not in _REGISTRY:
        raise PeftmergeError(f"unknown router {name!r}; choose one of: {', '.join(names())}"
                             f"{did_you_mean(name, names())}")
    return _REGISTRY[name]
