"""How a merge is computed: the one place that dispatches on what a method is.

A method's :attr:`~peftmerge.merge.registry.Method.route` decides (a YAML recipe of a mergekit method has route
``recipe``: its weights and parameters are resolved per tensor):

=========  ==============================================================  =======================================
route      one module of an adapter output (:func:`lora`)                  one tensor of a full model (:func:`full`)
=========  ==============================================================  =======================================
linear     exact in factor space; optimal truncation below the sum of     W0 + sum_i c_i dW_i, row blocks
           the input ranks
sparse     the engine's row blocks from the factors, then a block Krylov  the engine's row blocks
           SVD warm-started from the inputs' A
factored   the method's factor-space function, truncated optimally        the method on the stacked task vectors
dense      the method on the stacked task vectors, then a seeded          the method on the stacked task vectors
           randomized SVD
recipe     mergekit's definition on the stacked task vectors, then a      mergekit's definition, with W0
           seeded randomized SVD
=========  ==============================================================  =======================================

Every route runs in a *space* (the ``space`` parameter every method takes, :func:`space`): ``full`` as above, or, on
LoRA inputs, ``core`` (Core Space) or ``knots`` (KnOTS): the method runs on the inputs' representation there
(:mod:`peftmerge.merge.engine.spaces`, from the factors) and the merge comes back as exact factors of rank <= the sum
of the input ranks (:func:`in_space`), for adapter outputs and ``--base`` alike.

Every random choice of a module (random masks, the randomized SVD's start) comes from
:func:`module_generator` (seed, module name), so adapter and full-model outputs draw the same masks.
:func:`combine <peftmerge.merge.combine.combine>`, :func:`combine_full <peftmerge.merge.full_model.combine_full>`,
the in-memory merges of ``search`` and ``peftmerge methods`` all come here.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor

from ..errors import PeftmergeError
from .engine import blocked, blocks, krylov, selection, spaces, sparse_lora
from .methods import lowrank
from .methods.ops import mask_seed
from .plan import ModulePlan, stacked_deltas
from .registry import Context


def module_generator(seed: int, module: str) -> torch.Generator:
    """The generator of one module's random choices: seeded by ``seed`` and the module's name."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + zlib.crc32(module.encode()))


def context(params: dict, module: str, thresholds: Tensor | None = None, grams: list | None = None) -> Context:
    """The :class:`Context` of one module: its generator (:func:`module_generator`), global thresholds, Grams."""
    return Context(module, module_generator(params.get("seed", 0), module), thresholds, grams=grams)


def lora_default(m) -> str:
    """The space of ``m``'s adapter output when none is given: the method's own ``lora_space`` (WUDI: core), else
    full. Measured (docs/spaces.md; MiniLM, four tasks, adapters trained from their own initialisations, two training
    seeds): linear and factored methods are exact in factor space; the full-space LoRA output of an entrywise or dense
    method keeps its full-model merge's accuracy, while the same method on the cores loses up to 0.05 (della 0.915 vs
    0.966, pcb 0.947 vs 0.986) and DARE's drop-and-rescale over a core's few entries is noise (0.59-0.64 vs
    0.90-0.93)."""
    return getattr(m, "lora_space", None) or "full"


def space(m, params: dict, adapter_output: bool = True) -> str:
    """Where method ``m`` runs: ``params["space"]`` where given, else its family's default for adapter outputs
    (:func:`lora_default`) and ``full`` for full models. TIES' global trim ranks entries over the whole adapter's task
    vectors, which only the full space has: it runs in full space unless another is asked for, and is refused then."""
    given = params.get("space")
    global_trim = params.get("granularity") == "global"
    if given is None:
        return "full" if global_trim or not adapter_output else lora_default(m)
    if given != "full" and global_trim:
        raise PeftmergeError(f"granularity=global trims over the whole adapter's full-space task vectors; use "
                             f"granularity=tensor with space {given}, or space full")
    return given


def describe(m) -> str:
    """How a method's LoRA merge is computed (what ``peftmerge methods`` shows)."""
    route = m.route
    if lora_default(m) == "core":
        full = "per module from the factors" if route == "sparse" else "dense per module"
        return f"Core Space, exact, rank <= sum r_i (space full: {full}, then rank-r SVD)"
    if route == "linear":
        return "exact, factor space"
    if route == "factored":
        grams = "; needs --grams" if m.needs_grams else ""
        return ("exact, factor space" if m.components is not None else "factor space (SVDs of the factors)") + grams
    if route == "sparse":
        return "full space: per module from the factors, then rank-r SVD (space core/knots: exact, rank <= sum r_i)"
    return "full space: dense per module, then rank-r SVD (space core/knots: exact, rank <= sum r_i)"


def modules_in_parallel(m, params: dict | None = None) -> bool:
    """Whether an adapter's modules merge one per core (each single-threaded) rather than one at a time on every
    core: for the sparse merges, whose serial steps (thresholds, the Krylov SVD) would keep cores waiting, and for
    merges of many small steps (dense methods such as WUDI's Adam steps; any merge in Core Space or KnOTS', whose
    representations are small), where every core on one small op waits at its barrier."""
    return m.route in ("sparse", "dense") or space(m, params or {}) != "full"


def each_module(m, merge_one, plans: list[ModulePlan], params: dict | None = None):
    """Yield ``(k, merge_one(plans[k]))`` as the modules finish: one per core for the merges that gain from it
    (:func:`modules_in_parallel`), else one at a time on every core."""
    sizes = [plan.shape[0] * plan.shape[1] for plan in plans]
    yield from blocks.each_on_a_thread(merge_one, plans, sizes, None if modules_in_parallel(m, params) else 1)
    blocks.release("merged")  # this thread's M buffer (the module threads' go with them)


single_threaded_caller = blocked.single_threaded_caller


def global_thresholds(params: dict, n: int, stacks) -> Tensor | None:
    """Per-input magnitude thresholds over every task vector of the merge where ``granularity`` is ``global``
    (``stacks()``: a fresh iterator of (n, *shape) task vectors), else None."""
    if params.get("granularity") != "global":
        return None
    return selection.global_thresholds(stacks, n, params["density"])


# --- dense task vectors ---------------------------------------------------------------------------------------

def dense(m, deltas: Tensor, weights: Tensor, params: dict, ctx: Context | None = None) -> Tensor:
    """The merged task vector of stacked dense task vectors ``deltas`` (n, *shape): the method's definition, through
    the engine where it has a fast path."""
    ctx = ctx or Context()
    route = m.route
    if route == "sparse":
        return blocked.merge(m.sparse, blocked.Deltas.stacked(deltas.float()), weights, params,
                             seed=mask_seed(ctx.generator), thresholds=ctx.thresholds)
    if route == "recipe":
        return m.merge(ctx.module, None, deltas)
    return m.reference(deltas, weights, params, ctx)


# --- one module of an adapter output ------------------------------------------------------------------------

def lora(m, adapters, plan: ModulePlan, weights: Tensor | None, params: dict, rank: int | None, ctx: Context,
         deltas: Tensor | None = None) -> tuple[Tensor, Tensor, float]:
    """LoRA factors ``(A, B)`` of one module's merge and the relative Frobenius error of ``B @ A`` against the exact
    merge. ``rank``: the output rank (default: the sum of the input ranks; never truncated for ``cat``).
    ``deltas``: the module's stacked task vectors, where the caller holds them already."""
    route = m.route
    where = space(m, params)
    if where != "full":
        return _in_space(m, where, adapters, plan, weights, params, rank, ctx)
    if route == "linear":
        return _linear(adapters, plan, m.coefficients(weights, params), rank)
    target = min(rank or sum(plan.ranks(adapters)), *plan.shape)
    if route == "sparse":
        return _sparse(m, adapters, plan, weights, params, target, ctx)
    if route == "factored":
        return _factored(m, adapters, plan, weights, params, target, ctx)
    stack = deltas if deltas is not None else stacked_deltas(adapters, plan)
    if route == "recipe":  # the weight tensor's own settings (filters name tensors)
        name = f"{plan.name}.weight"
        return refactor(m.merge(name, None, stack), target, module_generator(m.seed, name))
    return _stacked(m, stack, plan, weights, params, target, ctx)


def lora_delta(m, adapters, plan: ModulePlan, weights: Tensor, params: dict, rank: int | None, ctx: Context,
               deltas: Tensor | None = None) -> Tensor:
    """The dense dW that :func:`lora` writes for this module (what a search patches into a model): a linear merge at
    full rank exactly as the weighted sum of ``deltas``, the others as ``B @ A``."""
    if m.route == "linear" and space(m, params) == "full" and (rank is None or rank >= sum(plan.ranks(adapters))):
        stack = deltas if deltas is not None else stacked_deltas(adapters, plan)
        return m.reference(stack, weights, params)
    a, b, _ = lora(m, adapters, plan, weights, params, rank, ctx, deltas)
    return b @ a


def refactor(merged: Tensor, rank: int, generator: torch.Generator) -> tuple[Tensor, Tensor, float]:
    """Rank-``rank`` factors ``(A, B)`` of a merged dense dW (seeded randomized SVD) and their relative error."""
    a, b, err = krylov.randomized_svd(merged, rank, generator=generator)
    if 0.0 < err < 0.1:  # the error from the Ritz values is ~1e-7 / (2 err) off: small ones computed directly
        err = float(torch.linalg.vector_norm(merged - b @ a, dtype=torch.float64)
                    / torch.linalg.vector_norm(merged, dtype=torch.float64))
    return a, b, err


def _truncation(b: Tensor, a: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """The optimal rank-``rank`` factors of ``b @ a`` (unchanged when its rank is no more) and the relative error."""
    if rank >= b.shape[1]:
        return a, b, 0.0
    a_k, b_k, s = lowrank.truncate_factors(b, a, rank)
    return a_k, b_k, float((s[rank:].square().sum() / s.square().sum().clamp(min=1e-30)).sqrt())


def _linear(adapters, plan, coeffs: Tensor, rank: int | None):
    """sum_i c_i dW_i exactly in factor space, truncated optimally to ``rank`` if that is less. Inputs with the same
    A add their B's (:func:`lowrank.sum_of_factors`), so x - x is exactly zero."""
    bs, as_ = [], []
    for i in plan.present:
        if float(coeffs[i]) == 0.0:
            continue
        a, b = adapters[i].scaled_factors(plan.name)
        bs.append(b * coeffs[i])
        as_.append(a)
    b, a = lowrank.sum_of_factors(bs, as_, plan.shape)
    return _truncation(b, a, min(rank or b.shape[1], *plan.shape))


def _stacked(m, deltas: Tensor, plan, weights, params: dict, rank: int, ctx: Context):
    """A dense method on the stacked task vectors (n, d_out, d_in), computed in the weight's own layout (rows are
    the weight's rows, as with --base: transposed for embeddings and Conv1D), refactorized to ``rank``."""
    if plan.transposed:
        deltas = deltas.transpose(1, 2).contiguous()
    a, b, err = refactor(dense(m, deltas, weights, params, ctx), rank, ctx.generator)
    return (b.T, a.T, err) if plan.transposed else (a, b, err)


def _factored(m, adapters, plan, weights, params: dict, rank: int, ctx: Context):
    """A factored method (TSV, Iso-C, RegMean) exactly in factor space (no dense dW), truncated optimally where
    ``rank`` is below its output rank, or by the method's own rule when it returns its error."""
    factors = [None] * len(adapters)
    for i in plan.present:
        a, b = adapters[i].scaled_factors(plan.name)
        factors[i] = (b * weights[i], a)
    ctx.rank = rank
    out = m.factored(factors, len(adapters), plan.shape, params, ctx)
    if len(out) == 3:  # truncated to ctx.rank by the method itself
        b, a, err = out
        return a, b, float(err)
    b, a = out
    return _truncation(b, a, rank)


def in_space(m, where: str, factors: list, shape: tuple[int, int], weights, params: dict, rank: int | None,
             ctx: Context, position: float = 0.0) -> tuple[Tensor, Tensor, float]:
    """The method on the inputs' representation in space ``where`` (``core`` or ``knots``; ``factors``: per input
    (B_i, A_i), scaled, or None), mapped back to LoRA factors ``(A, B)`` of rank <= sum r_i, exact (the top ``rank``
    directions where given, and the relative error of that truncation). A YAML recipe of a mergekit method merges
    the representations with its settings for the module's weight tensor (at layer ``position``)."""
    rep = spaces.represent(where, factors, shape)
    if rep.stack.numel() == 0:  # every input's update is zero
        return torch.zeros(1, shape[1]), torch.zeros(shape[0], 1), 0.0
    ctx.grams = spaces.grams(rep, ctx.grams)
    if m.route == "recipe":
        merged = m.merge(f"{ctx.module}.weight", None, rep.stack, position)
    else:
        merged = dense(m, rep.stack, weights, params, ctx)
    return spaces.lift(rep, merged, rank)


def _in_space(m, where: str, adapters, plan, weights, params: dict, rank: int | None, ctx: Context):
    """:func:`in_space` for one module of an adapter output, in the weight's own layout (rows are the weight's rows,
    as in full space: for embeddings and Conv1D the factors of dW^T; Gram-reading methods use (d_out, d_in))."""
    transposed = plan.transposed and not m.needs_grams
    factors = [None] * len(adapters)
    for i in plan.present:
        a, b = adapters[i].scaled_factors(plan.name)
        factors[i] = (a.T, b.T) if transposed else (b, a)
    shape = plan.shape[::-1] if transposed else plan.shape
    a, b, err = in_space(m, where, factors, shape, weights, params, rank, ctx)
    return (b.T, a.T, err) if transposed else (a, b, err)


def _sparse(m, adapters, plan, weights, params: dict, rank: int, ctx: Context):
    """A sparse method from the inputs' factors (:func:`sparse_lora.merge_to_rank`), in the weight's own layout
    (rows are the weight's rows, as with --base: for embeddings and Conv1D the factors of dW^T)."""
    with blocked.single_threaded_caller():  # small reads and checks: no OpenMP barrier on shared cores
        factors = []
        for i in range(len(adapters)):
            if i not in plan.present:
                factors.append(None)
                continue
            a, b = adapters[i].scaled_factors(plan.name)
            factors.append((a.T.contiguous(), b.T.contiguous()) if plan.transposed else (b, a))
        shape = plan.shape[::-1] if plan.transposed else plan.shape
        a, b, err = sparse_lora.merge_to_rank(m.sparse, factors, shape, weights, params, rank, ctx.generator,
                                              ctx.thresholds)
        return (b.T, a.T, err) if plan.transposed else (a, b, err)


# --- one tensor of a full model ----------------------------------------------------------------------------

def full(m, name: str, inputs: list, w0: Tensor, weights: Tensor | None, params: dict, ctx: Context, out: Tensor,
         ranges: list, stacked, position: float = 0.0) -> Tensor:
    """W0 + the merge of tensor ``name`` into ``out`` (any dtype), the (min, max) of its blocks appended to
    ``ranges``. ``inputs``: per input ``("theta", its tensor)``, ``("delta", its task vector)`` or None (unchanged),
    read by row blocks (:class:`blocked.Deltas`) with ``w0``, the base tensor as stored, or ``("factors", (B, A))``
    (the weight's layout) where the merge runs in Core Space or KnOTS' (:func:`in_space`); ``stacked()``: (W0 in
    float32, the (n, *shape) task vectors), for the routes that need them whole; ``position``: the tensor's place
    in the layers (a recipe's gradients)."""
    route = m.route
    if any(x is not None and x[0] == "factors" for x in inputs):  # LoRA weights in Core Space or KnOTS' space
        factors = [None if x is None else x[1] for x in inputs]
        a, b, _ = in_space(m, space(m, params, adapter_output=False), factors, tuple(w0.shape), weights, params,
                           None, ctx, position)
        out.copy_(w0.float() + b @ a)
        if out.numel():
            ranges.append(tuple(map(float, torch.aminmax(out))))
        return out
    src = blocked.Deltas(inputs, w0, tuple(w0.shape))
    if route == "linear":  # W0 + sum_i c_i dW_i
        return blocked.linear(src, m.coefficients(weights, params).tolist(), out, ranges=ranges)
    if route == "sparse":
        return blocked.merge(m.sparse, src, weights, params, seed=mask_seed(ctx.generator),
                             thresholds=ctx.thresholds, out=out, ranges=ranges)
    w0, deltas = stacked()
    if route == "recipe":  # mergekit's definition, its weights and parameters for this tensor
        out.copy_(m.merge(name, w0, deltas, position))
    else:
        out.copy_(m.reference(deltas, weights, params, ctx).add_(w0))
    if out.numel():
        ranges.append(tuple(map(float, torch.aminmax(out))))
    return out
