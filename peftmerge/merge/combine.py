"""``combine``: merge LoRA adapters into one LoRA adapter, streaming module by module.

Inputs are opened and checked first (:mod:`.plan`), then each module's task vectors dW_i = s_i B_i A_i are merged
by :func:`peftmerge.merge.execute.lora` (exact in factor space where the method allows, else refactorized to
``rank``, default the sum of the input ranks; the report gives each module's relative error), and the adapter is
written at the end, atomically (:mod:`peftmerge.io.adapter_writer`). With ``base`` the output is a full merged
model instead (:mod:`.full_model`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..errors import PeftmergeError
from ..io import adapter_writer, atomic
from ..io.adapter import LoraAdapter
from ..io.hub import describe_input
from ..io.meta import file_sha256
from . import biases, execute, registry, serve
from .methods.lowrank import factor_norm
from .plan import open_inputs, plan_modules, stacked_deltas
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
    params: dict | None = None,
    rank: int | None = None,
    dtype: str | None = None,
    alpha: float | None = None,
    config: str | Path | None = None,
    base: str | Path | None = None,
    shard_size: str | int | None = None,
    module_weights: dict[str, Sequence[float]] | None = None,
    grams: str | Path | None = None,
    serve_rank: str | int | None = None,
    overwrite: bool = False,
    force: bool = False,
    progress: bool = True,
    **shorthand,
) -> dict:
    """Merge LoRA adapters into one LoRA adapter folder ``out``; returns the merge report.

    ``method`` defaults to ``ties``. ``params``: its hyperparameters by name; each may also be given as a keyword
    of its own (``density=0.3``, ``lam=0.5`` for ``lambda``), and those left out take the method's (paper's) default,
    shown by ``peftmerge methods``. ``config`` reads a YAML recipe in mergekit's format, merged as
    mergekit defines it (:mod:`peftmerge.merge.recipe`; only ``seed`` may be added to it). ``grams``: the
    file of :func:`peftmerge.analysis.grams` that data-aware methods (regmean) read. ``serve_rank``
    (``"vllm"`` or a rank): every module at one rank a serving engine loads, zero-padded or optimally truncated
    (:mod:`peftmerge.merge.serve`).
    With ``base`` (or ``base_model`` in the recipe) the output is a full merged model instead, and inputs
    may also be full fine-tuned checkpoints of it (see :mod:`peftmerge.merge.full_model`).
    """
    given = registry.given(params, shorthand)
    serving = serve.parse(serve_rank)
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
    params["space"] = execute.space(m, params, adapter_output=not (base or recipe.base))  # where it runs
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
        if serving is not None:
            raise PeftmergeError("--serve-rank applies to LoRA adapter outputs; drop --base (or --serve-rank)")
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
    if serving is not None:
        serve.refuse_unservable(heads=sorted({h for a in adapters if a.head_keys
                                              for h in a.config.get("modules_to_save") or []}),
                                biases=bool(bias_stacks or trained))
    # over every task vector the adapter changes, biases included
    thresholds = execute.global_thresholds(params, n, lambda: (*(stacked_deltas(adapters, p) for p in plans),
                                                               *bias_stacks.values()))

    start = time.perf_counter()
    tasks = [a.task for a in adapters]

    def merge_module(plan):
        grams_of = gram_file.of(plan.name, tasks) if gram_file is not None else None
        ctx = execute.context(params, plan.name, thresholds, grams_of)
        return execute.lora(m, adapters, plan, per_module.get(plan.name, weights_t), params, recipe.rank, ctx)

    done: dict[int, tuple] = {}
    with tqdm(total=len(plans), desc=f"merge ({m.name})", unit="module", disable=not progress) as bar:
        for k, result in execute.each_module(m, merge_module, plans, params):
            done[k] = result
            bar.update()
    served = None
    if serving is not None:  # one rank for every module, as the serving engines load adapters
        fitted, served = serve.fit_all({k: (a, b) for k, (a, b, _) in done.items()}, serving)
        done = {k: (a, b, done[k][2], (done[k][0].shape[0], cut)) for k, (a, b, cut) in fitted.items()}
    tensors, rows = {}, []
    for k, plan in enumerate(plans):
        a, b, err, *fitted_from = done[k]
        norm = factor_norm(b.float(), a.float())
        a, b = _finite(plan.name, a, out_dtype), _finite(plan.name, b, out_dtype)
        if not math.isfinite(norm):
            raise PeftmergeError(f"merged module {plan.name}: its dW overflows float32 (norm {norm}); check the "
                                 "inputs' weights and scalings")
        tensors[plan.name] = (plan.kind, a.contiguous(), b.contiguous())
        rows.append({"module": plan.name, "inputs": [adapters[i].task for i in plan.present],
                     "rank_in": plan.ranks(adapters), "rank_out": a.shape[0], "relative_error": err, "norm": norm,
                     **({"rank_merged": fitted_from[0][0], "serve_error": fitted_from[0][1]} if fitted_from else {})})
    lora_biases = {}
    for name, stack in bias_stacks.items():  # lora_bias: merged like the --base path merges the bias tensor
        ctx = execute.context(params, f"{name}.bias", thresholds)
        lora_biases[name] = _finite(f"{name}.bias", execute.dense(m, stack, per_module.get(name, weights_t), params,
                                                                  ctx), out_dtype)
    trained = {name: _finite(name, t, out_dtype) for name, t in trained.items()}
    errors = [r["relative_error"] for r in rows]
    report = {
        "method": m.name, "params": params, "weights": w, "rank": recipe.rank, "dtype": str(out_dtype)[6:],
        **({"module_weights": {k: v.tolist() for k, v in per_module.items()}} if per_module else {}),
        **({"grams": {"path": str(grams), "data": gram_file.meta["data"]}} if gram_file is not None else {}),
        "inputs": [_describe(a) for a in adapters],
        "modules": len(rows), "rank_out_max": max(r["rank_out"] for r in rows),
        "relative_error_mean": sum(errors) / len(errors),
        "relative_error_max": max(errors), "seconds": round(time.perf_counter() - start, 3),
        **({"serve": served} if served else {}),
        "per_module": rows,
    }
    with atomic.atomic_dir(out, overwrite=overwrite) as tmp:
        adapter_writer.write_adapter(tmp, tensors, adapters, report, lora_biases=lora_biases, biases=trained)
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
