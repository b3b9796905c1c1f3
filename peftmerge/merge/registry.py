"""What a merge method is, and the one registry of them.

A method is a pure function over one module's stacked task vectors, registered by name with its parameters
(defaults = the paper's) and the paper it implements::

    fn(deltas: Tensor (n, *shape), weights: Tensor (n,), params: dict, ctx: Context) -> Tensor (*shape)

Its file in :mod:`peftmerge.merge.methods` is found by itself (pkgutil). What the method declares decides how
:mod:`peftmerge.merge.execute` computes it (its :attr:`Method.route`):

- ``linear``: per-input coefficients c_i instead of ``fn`` (merged = sum_i c_i dW_i), merged exactly in factor
  space, never a dense dW;
- ``sparse``: a :class:`Sparse` spec (sparsifier x consensus), computed by the row-blocked engine; ``fn`` stays the
  readable composition of :mod:`peftmerge.merge.methods.ops` that the tests hold the engine equal to;
- ``factored``: a function on the inputs' LoRA factors, exact in factor space (``fn`` serves full models);
- ``dense``: ``fn`` on the stacked dense task vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import PeftmergeError
from ..registry import Param, Registry, resolve

# Shared parameters: one definition for each meaning (a method file may define its own).
LAMBDA = Param("lambda", 1.0, "scale of the merged task vector", neutral=1.0, grid=(0.3, 0.5, 0.7, 1.0, 1.3, 1.6))
DENSITY = lambda default: Param("density", default, "fraction of entries KEPT", low=0.0, high=1.0,  # noqa: E731
                                low_open=True, per_model=True, neutral=1.0, grid=(0.1, 0.2, 0.4, 0.7))
GAMMA = Param("gamma", 0.01, "fraction of largest-magnitude entries dropped per row (outliers)", low=0.0, high=1.0,
              neutral=0.0, grid=(0.0, 0.01, 0.05))
SIGN = Param("sign", "total", "sign election: 'total' (sign of the sum) or 'frequency' (majority of signs)",
             choices=("total", "frequency"))
GRANULARITY = Param("granularity", "tensor", "magnitude trim per tensor, or over the whole adapter ('global')",
                    choices=("tensor", "global"))
SEED = Param("seed", 0, "random seed (random masks; the start block of the randomized SVD)", low=0)
# Where every method runs on LoRA inputs (:mod:`peftmerge.merge.engine.spaces`); None: the method's default
SPACE = Param("space", None, "where the method runs on LoRA inputs: full (the task vectors dW_i), core (Core Space: "
              "the cores U_B^T dW_i V_A) or knots (KnOTS: the rows S V_i^T of the SVD of [dW_1 .. dW_n]); default: "
              "full (WUDI: core; docs/spaces.md)",
              choices=("full", "core", "knots"), grid=("full", "core", "knots"))
# Not method hyperparameters, checked with the same rule (finite numbers):
WEIGHT = Param("weight", 1.0, "per-input weight", per_model=True)
ALPHA = Param("alpha", None, "lora_alpha of inputs that have no adapter_config.json")


@dataclass(frozen=True)
class Sparse:
    """A merge as mergekit decomposes it: a sparsifier, then a consensus over the inputs.

    ``sparsify``: ``"magnitude"`` (keep the top ``density`` of each |dW_i|, TIES' trim), ``"random"`` (DARE: keep
    with probability ``density``, rescale by 1/density), ``"rows"`` (Model Breadcrumbs: per row drop the top
    ``gamma``, keep the next ``density``), ``"none"``, or a row function, applied to each input's rows in place::

        sparsify(x: Tensor (rows, cols) float32, density: float, params: dict, draw: () -> Tensor (rows, cols))

    where ``draw()`` gives those entries' uniform draws in [0, 1) (float64) from the module's counter-based stream
    (:func:`peftmerge.merge.methods.ops.uniforms`), so a random row function draws what its reference draws.
    ``consensus``: ``"sum"`` (sum_i w_i dW_i) or ``"ties"`` (elect sign, disjoint mean).
    """

    sparsify: str | Callable
    consensus: str


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
    check: Callable | None = None  # (resolved params) -> None: a check across parameters (one-line errors)
    lora_space: str | None = None  # the space of an adapter output when none is given (None: full)

    @property
    def linear(self) -> bool:
        return self.coefficients is not None

    @property
    def route(self) -> str:
        """How :mod:`peftmerge.merge.execute` computes it: ``linear``, ``sparse``, ``factored`` or ``dense``."""
        if self.linear:
            return "linear"
        if self.sparse is not None:
            return "sparse"
        return "factored" if self.factored is not None else "dense"

    @property
    def random(self) -> bool:
        """Draws random masks (it declares ``seed``): another input order draws other masks."""
        return any(p.name == SEED.name for p in self.params)

    def reference(self, deltas: torch.Tensor, weights: torch.Tensor, params: dict, ctx: Context | None = None):
        """The method's definition on one module's stacked task vectors ``deltas`` (n, *shape): the readable math,
        which the engine's fast paths are tested equal to."""
        if self.linear:
            return torch.tensordot(self.coefficients(weights, params).to(deltas.dtype), deltas, dims=1)
        return self.fn(deltas, weights, params, ctx or Context())

    def resolve(self, given: dict, n: int) -> dict:
        """Defaults filled in, values checked; an unknown parameter is an error naming the valid ones.

        ``seed`` is accepted by every method (a sweep over methods passes one seed to all): methods that draw
        random masks declare it (default 0); for the others it is kept only when given, and seeds the start block
        of the randomized SVD that refactorizes a dense merge. ``space`` is accepted by every method and kept only
        when given (:func:`peftmerge.merge.execute.space` picks the default)."""
        out = resolve(self.params, given, n, f"method {self.name}", always=(SEED, SPACE))
        if self.check is not None:
            self.check(out)
        return out


REGISTRY: Registry[Method] = Registry("merge method", "peftmerge.merge.methods")


def register(name: str, *, paper: str, params: tuple[Param, ...] = (), linear: bool = False,
             aliases: tuple[str, ...] = (), exact_concat: bool = False, sparse: Sparse | None = None,
             factored: Callable | None = None, needs_grams: bool = False, components: Callable | None = None,
             check: Callable | None = None, lora_space: str | None = None):
    """Decorator: register ``fn`` (or, with ``linear=True``, a coefficient function) under ``name``.

    With ``sparse``, merges run on the blocked engine and ``fn`` is the reference it must equal. With
    ``factored``, LoRA inputs merge exactly in factor space: ``factored([(w_i s_i B_i, A_i) or None, ...], n,
    shape, params, ctx) -> (B, A)`` (None: that input does not adapt the module), equal to ``fn`` on the dense
    task vectors (``fn`` still serves full models); a method whose rank-k result is not the best rank-k
    approximation of its full one truncates to ``ctx.rank`` itself and returns ``(B, A, relative error against
    the full-rank result)``. ``needs_grams``: the method reads ``ctx.grams``.
    ``components``: the merge is linear in per-input shares, ``sum_i w_i c_i`` (a layer-wise search learns the
    w_i per module). ``check(params)``: a check that spans several parameters, raising a one-line error.
    ``lora_space``: the space (full, core, knots) an adapter output runs in when none is given, where it is not
    full (:func:`peftmerge.merge.execute.lora_default`)."""

    def wrap(fn: Callable) -> Callable:
        import sys

        doc = (sys.modules[fn.__module__].__doc__ or fn.__doc__ or "").strip()
        REGISTRY.add(name, Method(name=name, paper=paper, doc=doc, params=tuple(params),
                                  fn=None if linear else fn, coefficients=fn if linear else None,
                                  aliases=tuple(aliases), exact_concat=exact_concat, sparse=sparse,
                                  factored=factored, needs_grams=needs_grams, components=components, check=check,
                                  lora_space=lora_space),
                     aliases)
        return fn

    return wrap


def given(params: dict | None, shorthand: dict) -> dict:
    """The method parameters a call gives: ``params`` and the ones given as keywords of their own (``lam`` stands
    for ``lambda``, a Python keyword). Each is checked later against the method (:meth:`Method.resolve`)."""
    out = dict(params or {})
    for key, value in shorthand.items():
        name = "lambda" if key == "lam" else key
        if value is None:
            continue
        if out.get(name) is not None and out[name] != value:
            raise PeftmergeError(f"{name} is given twice ({out[name]!r} in params, {value!r} as a keyword); "
                                 "give it once")
        out[name] = value
    return out


def names() -> list[str]:
    """Every registered method name."""
    return REGISTRY.names()


def get(name: str) -> Method:
    """The method called ``name`` (or an alias); an unknown name lists the valid ones."""
    return REGISTRY.get(name)


def methods() -> list[Method]:
    """Every registered method, with its parameters and defaults (what ``peftmerge methods`` prints)."""
    return list(REGISTRY)


def parameters() -> dict[str, tuple[Param, list[str]]]:
    """Every method parameter once, by name: ``{name: (Param, [methods that take it])}`` (the first method's
    definition; methods sharing a name share its meaning). What the command line makes its options from."""
    out: dict[str, tuple[Param, list[str]]] = {}
    for m in methods():
        for p in (*m.params, *([] if m.random else [SEED]), SPACE):
            out.setdefault(p.name, (p, []))[1].append(m.name)
    return out
