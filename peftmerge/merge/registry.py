"""The one registry of merge methods.

A method is a pure function over one module's stacked task vectors::

    fn(deltas: Tensor (n, *shape), weights: Tensor (n,), params: dict, ctx: Context) -> Tensor (*shape)

registered by name with its parameters (defaults = the paper's) and the paper it implements.
A *linear* method instead gives per-input coefficients ``c_i`` (merged = sum_i c_i dW_i); those merge
exactly in factor space, without ever forming a dense ``dW``. A *sparse* method (``sparse=Sparse(...)``:
sparsifier x consensus) is computed by the row-blocked engine :mod:`peftmerge.merge.blocked`; its ``fn``
stays the readable composition of :mod:`peftmerge.merge.ops` that the tests hold the engine equal to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import PeftmergeError, did_you_mean
from . import blocked
from .blocked import Sparse


@dataclass(frozen=True)
class Param:
    """A method hyperparameter: its default and its valid range."""

    name: str
    default: Any
    help: str
    choices: tuple | None = None
    low: float | None = None  # exclusive lower bound where ``low_open``
    high: float | None = None
    low_open: bool = False
    per_model: bool = False  # may be given per input (a list) in the Python API / recipe

    def check(self, value: Any, n: int) -> Any:
        values = value if isinstance(value, (list, tuple)) else [value]
        if isinstance(value, (list, tuple)):
            if not self.per_model:
                raise PeftmergeError(f"{self.name} takes one value, got a list {list(value)}")
            if len(value) != n:
                raise PeftmergeError(f"{self.name} has {len(value)} values for {n} inputs; give one per input")
        for v in values:
            if self.choices is not None:
                if v not in self.choices:
                    raise PeftmergeError(f"{self.name} {v!r} is not one of {', '.join(map(str, self.choices))}")
                continue
            try:
                if isinstance(v, bool):
                    raise TypeError
                fv = float(v)
            except (TypeError, ValueError, OverflowError):
                raise PeftmergeError(f"{self.name} {v!r} is not a number") from None
            if not math.isfinite(fv):
                raise PeftmergeError(f"{self.name} {v} is not a finite number; give a finite value")
            if self.low is not None and (fv <= self.low if self.low_open else fv < self.low):
                raise PeftmergeError(f"{self.name} {v} is out of range: {self._range()}")
            if self.high is not None and fv > self.high:
                raise PeftmergeError(f"{self.name} {v} is out of range: {self._range()}")
        return list(value) if isinstance(value, (list, tuple)) else value

    def _range(self) -> str:
        lo = "(" if self.low_open else "["
        return f"must be in {lo}{self.low}, {self.high}]" if self.high is not None else f"must be >= {self.low}"


# Shared parameter definitions (one place for each meaning).
LAMBDA = Param("lambda", 1.0, "scale of the merged task vector", low=None)
DENSITY = lambda default: Param("density", default, "fraction of entries KEPT", low=0.0, high=1.0,  # noqa: E731
                                low_open=True, per_model=True)
GAMMA = Param("gamma", 0.01, "fraction of largest-magnitude entries dropped per row (outliers)", low=0.0, high=1.0)
SIGN = Param("sign", "total", "sign election: 'total' (sign of the sum) or 'frequency' (majority of signs)",
             choices=("total", "frequency"))
GRANULARITY = Param("granularity", "tensor", "magnitude trim per tensor, or over the whole adapter ('global')",
                    choices=("tensor", "global"))
SEED = Param("seed", 0, "random seed (DARE's drop masks; the start block of the randomized SVD)", low=0)
# Not method hyperparameters, checked with the same rule (finite numbers):
WEIGHT = Param("weight", 1.0, "per-input weight", per_model=True)
ALPHA = Param("alpha", None, "lora_alpha of inputs that have no adapter_config.json")


@dataclass
class Context:
    """What a method may need beyond the tensors."""

    module: str = ""
    generator: torch.Generator | None = None
    thresholds: torch.Tensor | None = None  # (n,) per-input magnitude thresholds for granularity=global
    grams: list | None = None  # data-aware methods (regmean): each input's Gram matrix of this module's inputs
    rank: int | None = None  # the output rank (factored methods that truncate by their own rule, e.g. Iso-C)


@dataclass(frozen=True)
class Method:
    name: str
    paper: str
    doc: str
    params: tuple[Param, ...]
    fn: Callable | None = None
    coefficients: Callable | None = None  # linear methods: (weights, params) -> (n,)
    aliases: tuple[str, ...] = ()
    exact_concat: bool = False  # `cat`: never truncated
    sparse: Sparse | None = None  # computed by the blocked engine (``fn`` is the reference composition)
    factored: Callable | None = None  # on LoRA inputs: (factors, n, shape, params, ctx) -> (B, A[, error])
    needs_grams: bool = False  # reads per-input Gram matrices (``peftmerge grams``) from ctx.grams
    components: Callable | None = None  # (deltas, params, ctx) -> (n, *shape) shares c_i, merged = sum_i w_i c_i

    @property
    def linear(self) -> bool:
        return self.coefficients is not None

    def merge(self, deltas: torch.Tensor, weights: torch.Tensor, params: dict, ctx: Context | None = None):
        """Merge one module's stacked task vectors ``deltas`` (n, *shape)."""
        if self.linear:
            c = self.coefficients(weights, params).to(deltas.dtype)
            return torch.tensordot(c, deltas, dims=1)
        ctx = ctx or Context()
        if self.sparse is not None:
            return blocked.merge(self.sparse, blocked.Deltas.stacked(deltas.float()), weights, params,
                                 seed=blocked.mask_seed(ctx.generator), thresholds=ctx.thresholds)
        return self.fn(deltas, weights, params, ctx)

    def resolve(self, given: dict, n: int) -> dict:
        """Defaults filled in, values checked; an unknown parameter is an error naming the valid ones.

        ``seed`` is accepted by every method (a sweep over methods passes one seed to all): methods that
        draw random masks declare it (default 0); for the others it is kept only when given, and seeds the
        start block of the randomized SVD that refactorizes a dense merge."""
        known = {p.name: p for p in self.params}
        for key, value in given.items():
            if value is None:
                continue
            if key not in known and key != SEED.name:
                valid = ", ".join(known) or "none"
                raise PeftmergeError(f"method {self.name} takes no parameter {key!r} (its parameters: {valid})")
        out = {p.name: p.check(given[p.name], n) if given.get(p.name) is not None else p.default
               for p in self.params}
        if SEED.name not in known and given.get(SEED.name) is not None:
            out[SEED.name] = SEED.check(given[SEED.name], n)
        return out


_REGISTRY: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}


def register(name: str, *, paper: str, params: tuple[Param, ...] = (), linear: bool = False,
             aliases: tuple[str, ...] = (), exact_concat: bool = False, sparse: Sparse | None = None,
             factored: Callable | None = None, needs_grams: bool = False, components: Callable | None = None):
    """Decorator: register ``fn`` (or, with ``linear=True``, a coefficient function) under ``name``.

    With ``sparse``, merges run on the blocked engine and ``fn`` is the reference it must equal. With
    ``factored``, LoRA inputs merge exactly in factor space: ``factored([(w_i s_i B_i, A_i) or None, ...], n,
    shape, params, ctx) -> (B, A)`` (None: that input does not adapt the module), equal to ``fn`` on the dense
    task vectors (``fn`` still serves full models); a method whose rank-k result is not the best rank-k
    approximation of its full one truncates to ``ctx.rank`` itself and returns ``(B, A, relative error against
    the full-rank result)``. ``needs_grams``: the method reads ``ctx.grams``.
    ``components``: the merge is linear in per-input shares, ``sum_i w_i c_i`` (a layer-wise search learns the
    w_i per module)."""

    def wrap(fn: Callable) -> Callable:
        import sys

        doc = (sys.modules[fn.__module__].__doc__ or fn.__doc__ or "").strip()
        method = Method(name=name, paper=paper, doc=doc, params=tuple(params),
                        fn=None if linear else fn, coefficients=fn if linear else None,
                        aliases=tuple(aliases), exact_concat=exact_concat, sparse=sparse, factored=factored,
                        needs_grams=needs_grams, components=components)
        _REGISTRY[name] = method
        for a in aliases:
            _ALIASES[a] = name
        return fn

    return wrap


def _load_all() -> None:
    from . import methods  # noqa: F401  (importing registers every method)


def names() -> list[str]:
    """Every registered method name."""
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> Method:
    """The method called ``name`` (or an alias); an unknown name lists the valid ones."""
    _load_all()
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise PeftmergeError(f"unknown merge method {name!r}; choose one of: {', '.join(names())}"
                             f"{did_you_mean(name, [*names(), *_ALIASES])}")
    return _REGISTRY[key]


def methods() -> list[Method]:
    """Every registered method, with its parameters and defaults (what ``peftmerge methods`` prints)."""
    return [get(n) for n in names()]
