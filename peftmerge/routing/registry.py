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

from dataclasses import dataclass, field
from typing import Callable

from ..errors import PeftmergeError
from ..registry import Param, Registry, resolve

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
        try:
            return resolve(self.params, given, 1, f"router {self.name}")
        except PeftmergeError as e:
            message = str(e)
            raise PeftmergeError(message if message.startswith("router ") else f"router {self.name}: {message}") \
                from None


REGISTRY: Registry[Strategy] = Registry("router", ("peftmerge.routing.arrow", "peftmerge.routing.centroid",
                                                   "peftmerge.routing.probe"))


def register(name: str, *, paper: str, params: tuple[Param, ...], score: Callable | None = None,
             per_token: bool = False):
    """Decorator on a router's ``build`` function."""

    def wrap(build: Callable) -> Callable:
        import sys

        doc = (sys.modules[build.__module__].__doc__ or "").strip()
        REGISTRY.add(name, Strategy(name, paper, doc, tuple(params), build, score, per_token))
        return build

    return wrap


def names() -> list[str]:
    """Every registered router name."""
    return REGISTRY.names()


def get(name: str) -> Strategy:
    """The router called ``name``; an unknown name lists the valid ones."""
    return REGISTRY.get(name)


def parameters() -> dict[str, tuple[Param, list[str]]]:
    """Every router parameter once, by name: ``{name: (Param, [routers that take it])}`` (the first router's
    definition). What ``peftmerge route build`` makes its options from."""
    out: dict[str, tuple[Param, list[str]]] = {}
    for strategy in REGISTRY:
        for p in strategy.params:
            out.setdefault(p.name, (p, []))[1].append(strategy.name)
    return out
