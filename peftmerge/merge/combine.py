"""``combine``: merge LoRA adapters into one LoRA adapter, streaming module by module.

For each module the inputs' task vectors dW_i = s_i B_i A_i are merged with the chosen method:

- linear methods (task_arithmetic, cat) stay in factor space: B = [c_1 s_1 B_1, ...], A = [A_1; ...]
  is exact; a smaller ``rank`` truncates it optimally through QR + SVD of the small core;
- the sparse ones (TIES, DARE, magnitude prune, breadcrumbs) merge this module's dW_i block by block from
  the factors and refactorize to ``rank`` (default: the sum of the input ranks) by a block Krylov SVD
  started from the inputs' factors (:mod:`peftmerge.merge.sparse_lora`); the others (PCB) form the dense
  dW_i of this module and use a seeded randomized SVD. The report gives each module's relative error.
"""

from __future__ import annotations

import math
import time
import zlib
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..errors import PeftmergeError
from ..io import atomic
from ..io.adapter import LoraAdapter
from ..io.hub import describe_input
from ..io.meta import file_sha256
from . import biases, blocked, blocks, lowrank, ops, registry, sparse_lora
from .plan import ModulePlan, open_inputs, plan_modules
from .recipe import Recipe, load_recipe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str | None) -> torch.dtype:
    if name is None:
        return torch.float32
    if name not in DTYPES:
        raise PeftmergeError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _describe(a: LoraAdapter) -> dict:
    """How the recipe pins an input: its path or Hub id, task, sha256 (and Hub revision)."""
    entry = {"path": a.ref, "task": a.task, "sha256": file_sha256(a.file.path), "base_model": a.base_model}
    pinned = describe_input(a.ref, a.path)
    if "revision" in pinned:
        entry["revision"] = pinned["revision"]
    return entry


def _module_generator(seed: int, module: str) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + zlib.crc32(module.encode()))


def stacked_deltas(adapters: list[LoraAdapter], plan: ModulePlan) -> torch.Tensor:
    """(n, d_out, d_in): each input's dW of this module, zeros where an input does not adapt it."""
    out = torch.zeros(len(adapters), *plan.shape)
    for i in plan.present:
        out[i] = adapters[i].delta(plan.name)
    return out


def merge_linear(adapters, plan, coeffs: torch.Tensor, rank: int | None):
    """Exact factor-space merge of sum_i c_i dW_i; returns (A, B, relative error of the truncation).
    Inputs with the same A add their B's (:func:`lowrank.sum_of_factors`), so x - x is exactly zero."""
    bs, as_ = [], []
    for i in plan.present:
        if float(coeffs[i]) == 0.0:
            continue
        a, b = adapters[i].scaled_factors(plan.name)
        bs.append(b * coeffs[i])
        as_.append(a)
    b, a = lowrank.sum_of_factors(bs, as_, plan.shape)
    total = b.shape[1]
    target = min(rank or total, *plan.shape)
    if target >= total:
        return a, b, 0.0
    a_k, b_k, s = lowrank.truncate_factors(b, a, target)
    err = (s[target:].square().sum() / s.square().sum().clamp(min=1e-30)).sqrt()
    return a_k, b_k, float(err)


def merge_dense(merged: torch.Tensor, rank: int, generator: torch.Generator):
    """Refactorize a merged dense dW to ``rank``; returns (A, B, relative Frobenius error)."""
    a, b, err = lowrank.randomized_svd(merged, rank, generator=generator)
    if 0.0 < err < 0.1:  # the error from the Ritz values is ~1e-7 / (2 err) off: small ones computed directly
        err = float(torch.linalg.vector_norm(merged - b @ a, dtype=torch.float64)
                    / torch.linalg.vector_norm(merged, dtype=torch.float64))
    return a, b, err


def merge_stacked(m: registry.Method, deltas: torch.Tensor, plan, weights, params: dict, rank: int,
                  ctx: registry.Context):
    """A dense method on this module's stacked task vectors (n, d_out, d_in), computed in the weight's own layout
    (rows are the weight's rows, as with --base: transposed for embeddings and Conv1D), refactorized to ``rank``;
    returns (A, B, relative error)."""
    if plan.transposed:
        deltas = deltas.transpose(1, 2).contiguous()
    a, b, err = merge_dense(m.merge(deltas, weights, params, ctx), rank, ctx.generator)
    return (b.T, a.T, err) if plan.transposed else (a, b, err)


def merge_factored(m: registry.Method, adapters, plan, weights, params: dict, rank: int, ctx=None):
    """A factored method (TSV, Iso-C, RegMean) on this module's LoRA inputs, exactly in factor space (no dense
    dW), truncated optimally where ``rank`` is below its output rank (or by the method's own rule, when it
    returns its error); returns (A, B, relative error)."""
    factors = [None] * len(adapters)
    for i in plan.present:
        a, b = adapters[i].scaled_factors(plan.name)
        factors[i] = (b * weights[i], a)
    ctx = ctx or registry.Context(plan.name)
    ctx.rank = rank
    out = m.factored(factors, len(adapters), plan.shape, params, ctx)
    if len(out) == 3:  # truncated to ctx.rank by the method itself
        b, a, err = out
        return a, b, float(err)
    b, a = out
    if rank >= b.shape[1]:
        return a, b, 0.0
    a_k, b_k, s = lowrank.truncate_factors(b, a, rank)
    return a_k, b_k, float((s[rank:].square().sum() / s.square().sum().clamp(min=1e-30)).sqrt())


def merge_sparse(m: registry.Method, adapters, plan, weights, params: dict, rank: int, generator, thresholds=None):
    """A sparse method's merge of this module's LoRA inputs refactorized to ``rank``, straight from their
    factors (:func:`sparse_lora.merge_to_rank`), in the weight's own layout (rows are the weight's rows, as with
    --base: for embeddings and Conv1D the factors of dW^T); returns (A, B, relative error)."""
    with blocked.single_threaded_caller():  # small reads and checks: no OpenMP barrier on shared cores
        factors = []
        for i in range(len(adapters)):
            if i not in plan.present:
                factors.append(None)
                continue
            a, b = adapters[i].scaled_factors(plan.name)
            factors.append((a.T.contiguous(), b.T.contiguous()) if plan.transposed else (b, a))
        shape = plan.shape[::-1] if plan.transposed else plan.shape
        a, b, err = sparse_lora.merge_to_rank(m.sparse, factors, shape, weights, params, rank, generator, thresholds)
        return (b.T, a.T, err) if plan.transposed else (a, b, err)


def _refuse_checkpoints(inputs) -> None:
    from ..io.checkpoint import is_checkpoint

    for p in inputs:
        if is_checkpoint(p):
            raise PeftmergeError(f"{p}: a full model checkpoint, not a LoRA adapter; to merge full models pass "
                                 "--base BASE (the model they were fine-tuned from) to write a full merged model")


def _module_weights(given: dict | None, plans, n: int) -> dict[str, torch.Tensor]:
    """``{module: weights}`` checked against the adapters' modules and the number of inputs."""
    if not given:
        return {}
    known = {p.name for p in plans}
    unknown = sorted(set(given) - known)
    if unknown:
        raise PeftmergeError(f"module_weights names modules the adapters do not have: {unknown[:3]}; use module "
                             f"names as the adapters give them (e.g. {sorted(known)[0]})")
    out = {}
    for name, ws in given.items():
        if len(ws) != n:
            raise PeftmergeError(f"module_weights[{name!r}] has {len(ws)} weights for {n} inputs; give one per input")
        out[name] = torch.tensor([float(x) for x in registry.WEIGHT.check(list(ws), n)], dtype=torch.float32)
    return out


def open_grams(m: registry.Method, grams, inputs):
    """The grams file a data-aware method reads (checked against the inputs later); None for the others."""
    if not m.needs_grams:
        if grams:
            raise PeftmergeError(f"--grams is read by data-aware methods (regmean) only; drop it for {m.name}")
        return None
    if not grams:
        raise PeftmergeError(f"{m.name} needs the Gram matrices of the inputs' layer inputs: run `peftmerge grams "
                             f"{' '.join(map(str, inputs))} --data TASK=FILE ... -o grams.safetensors`, then pass "
                             "--grams grams.safetensors")
    from ..io.grams import Grams

    return Grams(grams)


def _resolve_recipe(inputs, method, weights, params, rank, dtype, config) -> Recipe:
    recipe = load_recipe(config) if config else Recipe(inputs=[])
    if config and inputs:
        raise PeftmergeError(f"inputs are given both on the command line and in {config}; give them in one place")
    if not config:
        recipe.inputs = [str(p) for p in inputs]
    else:  # the recipe defines the merge (mergekit's conventions); only the seed of random masks may be added
        recipe.set_overrides(method, weights, params)
        method, weights, params = None, None, {}
    recipe.method = method or recipe.method
    recipe.weights = list(weights) if weights is not None else recipe.weights
    recipe.params.update({k: v for k, v in params.items() if v is not None})
    recipe.rank = rank if rank is not None else recipe.rank
    recipe.dtype = dtype or recipe.dtype
    return recipe


def combine(
    inputs: Sequence[str | Path] = (),
    out: str | Path = "merged",
    method: str | None = None,
    *,
    weights: Sequence[float] | None = None,
    lam: float | None = None,
    density: float | Sequence[float] | None = None,
    gamma: float | None = None,
    sign: str | None = None,
    granularity: str | None = None,
    seed: int | None = None,
    rank: int | None = None,
    dtype: str | None = None,
    alpha: float | None = None,
    config: str | Path | None = None,
    base: str | Path | None = None,
    shard_size: str | int | None = None,
    module_weights: dict[str, Sequence[float]] | None = None,
    off_diagonal: float | None = None,
    grams: str | Path | None = None,
    overwrite: bool = False,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Merge LoRA adapters into one LoRA adapter folder ``out``; returns the merge report.

    ``method`` defaults to ``ties``; every hyperparameter left ``None`` takes the method's (paper's)
    default, shown by ``peftmerge methods``. ``config`` reads a YAML recipe in mergekit's format, merged as
    mergekit defines it (:mod:`peftmerge.merge.recipe`; only ``seed`` may be added to it). ``grams``: the
    file of :func:`peftmerge.analysis.grams` that data-aware methods (regmean) read.
    With ``base`` (or ``base_model`` in the recipe) the output is a full merged model instead, and inputs
    may also be full fine-tuned checkpoints of it (see :mod:`peftmerge.merge.full_model`).
    """
    given = {"lambda": lam, "density": density, "gamma": gamma, "sign": sign, "granularity": granularity,
             "seed": seed, "off_diagonal": off_diagonal}
    recipe = _resolve_recipe(inputs, method, weights, given, rank, dtype, config)
    m = recipe.mergekit or registry.get(recipe.method)  # a YAML recipe of a mergekit method: mergekit's definition
    n = len(recipe.inputs)
    if n == 0:
        raise PeftmergeError("no inputs; give one or more LoRA adapters (folders or .safetensors files)")
    w = recipe.weights if recipe.weights is not None else [1.0] * n
    if len(w) != n:
        raise PeftmergeError(f"{len(w)} weights for {n} inputs; give one weight per input (e.g. --weights "
                             f"{','.join(['1'] * n)})")
    if recipe.mergekit is None:  # a mergekit recipe checks its own (gradient lists, filters)
        w = registry.WEIGHT.check(list(w), n)  # finite numbers, like every parameter
    if alpha is not None:
        registry.ALPHA.check(alpha, n)
    params = m.resolve(recipe.params, n)
    if recipe.rank is not None and (not isinstance(recipe.rank, int) or recipe.rank < 1):
        raise PeftmergeError(f"rank {recipe.rank} must be a positive integer")
    out_dtype = _dtype(recipe.dtype)
    out = atomic.check_output(out, [Path(p) for p in (*recipe.inputs, config, grams, base) if p], overwrite)
    gram_file = open_grams(m, grams, recipe.inputs)
    if base or recipe.base:
        if gram_file is not None:
            raise PeftmergeError(f"{m.name} writes LoRA adapters only; drop --base (merge, then load the adapter "
                                 "onto the base model)")
        if module_weights:
            raise PeftmergeError("module_weights apply to LoRA outputs only; drop --base (or module_weights)")
        from .full_model import combine_full

        return combine_full(recipe, m, params, w, base=base or recipe.base, out=out, shard_size=shard_size,
                            dtype=out_dtype if recipe.dtype else None, alpha=alpha, overwrite=overwrite,
                            force=force, progress=progress)
    if shard_size is not None:
        raise PeftmergeError("--shard-size applies to full merged models; pass --base BASE or drop it")
    _refuse_checkpoints(recipe.inputs)

    adapters = open_inputs(recipe.inputs, alpha=alpha, force=force, merges_biases=True)
    plans = plan_modules(adapters, force=force)
    if gram_file is not None:
        gram_file.check(adapters)
    if m.exact_concat and recipe.rank is not None:
        raise PeftmergeError(f"{m.name} is exact concatenation and takes no --rank; "
                             "use --method task_arithmetic --rank R to truncate")
    recipe.check_adapter_output(adapters, plans, module_weights)
    weights_t = torch.tensor(w, dtype=torch.float32) if recipe.mergekit is None else None
    per_module = _module_weights(module_weights, plans, n)
    bias_stacks = {p.name: st for p in plans if (st := biases.lora_bias_stack(adapters, p)) is not None}
    if bias_stacks and any(p.kind == "embedding" for p in plans):
        raise PeftmergeError(f"{next(a.path for a in adapters if a.config.get('lora_bias'))}: lora_bias updates and "
                             "an embedding LoRA cannot share one PEFT adapter (PEFT has no lora_bias on embeddings); "
                             "pass --base BASE for a full merged model, or merge them separately")
    trained = biases.trained_biases(m, adapters, lambda name: per_module.get(name, weights_t), params)
    thresholds = None
    if params.get("granularity") == "global":  # over every task vector the adapter changes, biases included
        thresholds = ops.global_thresholds(lambda: (*(stacked_deltas(adapters, p) for p in plans),
                                                    *bias_stacks.values()), n, params["density"])

    start = time.perf_counter()
    tasks = [a.task for a in adapters]

    def merge_module(plan):
        if recipe.mergekit is not None:  # weights and parameters per module (gradients, filters)
            return recipe.mergekit.merge_module(adapters, plan, recipe.rank)
        w_plan = per_module.get(plan.name, weights_t)
        if m.linear:
            return merge_linear(adapters, plan, m.coefficients(w_plan, params), recipe.rank)
        gen = _module_generator(params.get("seed", 0), plan.name)
        target = min(recipe.rank or sum(plan.ranks(adapters)), *plan.shape)
        if m.sparse is not None:  # the blocked engine from the factors, warm-started Krylov SVD
            return merge_sparse(m, adapters, plan, w_plan, params, target, gen, thresholds)
        if m.factored is not None:  # SVDs / transforms of the factors, never a dense dW
            ctx = registry.Context(plan.name, gen, grams=gram_file and gram_file.of(plan.name, tasks))
            return merge_factored(m, adapters, plan, w_plan, params, target, ctx)
        ctx = registry.Context(plan.name, gen, thresholds)
        return merge_stacked(m, stacked_deltas(adapters, plan), plan, w_plan, params, target, ctx)

    # sparse merges: a module per core (each single-threaded) beats every core on one module at a time
    workers = None if m.sparse is not None and not m.linear else 1
    done: dict[int, tuple] = {}
    sizes = [plan.shape[0] * plan.shape[1] for plan in plans]
    with tqdm(total=len(plans), desc=f"merge ({m.name})", unit="module", disable=not progress) as bar:
        for k, result in blocks.each_on_a_thread(merge_module, plans, sizes, workers):
            done[k] = result
            bar.update()
    blocks.release("merged")  # this thread's M buffer (the module threads' go with them)
    tensors, rows = {}, []
    for k, plan in enumerate(plans):
        a, b, err = done[k]
        norm = lowrank.factor_norm(b.float(), a.float())
        a, b = _finite(plan.name, a, out_dtype), _finite(plan.name, b, out_dtype)
        if not math.isfinite(norm):
            raise PeftmergeError(f"merged module {plan.name}: its dW overflows float32 (norm {norm}); check the "
                                 "inputs' weights and scalings")
        tensors[plan.name] = (plan.kind, a.contiguous(), b.contiguous())
        rows.append({"module": plan.name, "inputs": [adapters[i].task for i in plan.present],
                     "rank_in": plan.ranks(adapters), "rank_out": a.shape[0], "relative_error": err, "norm": norm})
    lora_biases = {}
    for name, stack in bias_stacks.items():  # lora_bias: merged like the --base path merges the bias tensor
        ctx = registry.Context(f"{name}.bias", _module_generator(params.get("seed", 0), f"{name}.bias"), thresholds)
        lora_biases[name] = _finite(f"{name}.bias", m.merge(stack, per_module.get(name, weights_t), params, ctx),
                                    out_dtype)
    trained = {name: _finite(name, t, out_dtype) for name, t in trained.items()}
    errors = [r["relative_error"] for r in rows]
    report = {
        "method": m.name, "params": params, "weights": w, "rank": recipe.rank, "dtype": str(out_dtype)[6:],
        **({"module_weights": {k: v.tolist() for k, v in per_module.items()}} if per_module else {}),
        **({"grams": {"path": str(grams), "data": gram_file.meta["data"]}} if gram_file is not None else {}),
        "inputs": [_describe(a) for a in adapters],
        "modules": len(rows), "relative_error_mean": sum(errors) / len(errors),
        "relative_error_max": max(errors), "seconds": round(time.perf_counter() - start, 3),
        "per_module": rows,
    }
    from ..io.adapter_writer import write_adapter  # imports peft: only needed here

    with atomic.atomic_dir(out, overwrite=overwrite) as tmp:
        write_adapter(tmp, tensors, adapters, report, lora_biases=lora_biases, biases=trained)
    return report


def _finite(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in the output ``dtype``, or a one-line refusal if it is not finite there (before anything is written)."""
    out = t.to(dtype)
    if bool(torch.isfinite(out).all()):
        return out
    if bool(torch.isfinite(t).all()):
        raise PeftmergeError(f"merged module {name} overflows {str(dtype)[6:]} (largest entry "
                             f"{float(t.abs().max()):.3g}); write with --dtype float32 or bfloat16")
    raise PeftmergeError(f"merged module {name} is not finite (NaN/Inf); check the inputs' weights and scalings")
