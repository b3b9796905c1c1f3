"""``extract``: a LoRA adapter from a full fine-tune, the optimal rank-k approximation of each weight change.

For every Linear, Conv1D and Embedding weight of FINETUNED that differs from BASE, in storage order:

    dW   = W_ft - W_base                               # float32, in LoRA's (d_out, d_in) layout
    dW  ~= B A,  B A = U_k S_k V_k^T                   # Eckart-Young: the best rank-k approximation
    err  = ||dW - B A||_F / ||dW||_F = sqrt(sum_{i>k} s_i^2 / sum_i s_i^2)

k is ``rank`` (at most), or the smallest k keeping the fraction ``energy`` of ||dW||_F^2, never more than
the numerical rank of dW (directions below float32 rounding carry nothing). The SVD: for a rank well below
the smaller dimension, a seeded block Krylov iteration (``krylov.randomized_svd``) run until the error
stops falling; otherwise (and for ``energy``, which needs the whole spectrum) the float64 Gram matrix of
dW's smaller side (G = M^T M, accumulated by row blocks, then ``eigh``), B A = dW V_k V_k^T. The reported
error is measured on the written factors, ||dW - B A||_F / ||dW||_F. Only one weight of each model is in
memory at a time (``io.checkpoint`` reads them lazily).

Embeddings are written in PEFT's ``lora_embedding_A/B`` layout (dW^T = B A), transformers' Conv1D with
``fan_in_fan_out``. Changed tensors a LoRA cannot carry (norms, biases) are listed in the report.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import PeftmergeError
from ..io import atomic
from ..io.adapter_writer import lora_config, lora_keys
from ..io.card import write_card
from ..io.checkpoint import Checkpoint, is_checkpoint
from ..io.hub import resolve
from . import serve
from .engine import krylov

log = logging.getLogger(__name__)
REPORT = "extract_report.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ROWS = 4096  # rows per block of the Gram matrix and of the error (float64 copies of that size only)
KRYLOV_OVERSAMPLE = 8
KRYLOV_RATIO = 10  # block Krylov when (rank + oversample) * ratio <= min(d_out, d_in): measured faster there


# --- math ------------------------------------------------------------------------------------------------

def gram_svd(m: Tensor) -> tuple[Tensor, Tensor, bool]:
    """Squared singular values (descending, float64) and right singular vectors of ``m`` or ``m^T``.

    M = m if m is tall, else m^T (so M is (p, q) with q = min(d_out, d_in)); G = M^T M in float64 by
    blocks of rows; eigh(G) = V diag(s^2) V^T. Returns ``(s^2, V, transposed)``.
    """
    transposed = m.shape[0] < m.shape[1]
    mm = m.T if transposed else m
    g = torch.zeros(mm.shape[1], mm.shape[1], dtype=torch.float64)
    for r in range(0, mm.shape[0], ROWS):
        block = mm[r:r + ROWS].double()
        g.addmm_(block.T, block)
    lam, v = torch.linalg.eigh(g)  # ascending
    return lam.flip(0).clamp(min=0), v.flip(1), transposed


def choose_rank(s2: Tensor, shape: tuple[int, int], rank: int | None, energy: float | None) -> int:
    """k: ``rank`` and/or the smallest rank keeping ``energy`` of sum s^2, at most the numerical rank
    (s_i > s_max * max(shape) * eps(float32): below that, dW's own float32 rounding)."""
    if s2.numel() == 0 or float(s2[0]) == 0.0:
        return 0
    s = s2.sqrt()
    k = int((s > s[0] * max(shape) * torch.finfo(torch.float32).eps).sum())
    if rank is not None:
        k = min(k, rank)
    if energy is not None:
        kept = torch.cumsum(s2, 0) / s2.sum()
        k = min(k, int((kept < energy - 1e-12).sum()) + 1)
    return max(k, 1)


def low_rank(m: Tensor, rank: int | None = None, energy: float | None = None) -> tuple[Tensor, Tensor, float]:
    """LoRA factors ``(A, B)`` of the best rank-k approximation of ``m`` (d_out, d_in) and the relative
    Frobenius error of ``B @ A``, k chosen by :func:`choose_rank`. The singular values are split evenly
    between the factors (B = U sqrt(S), A = sqrt(S) V^T). ``m`` all zero: k = 0, error 0.

    A rank well below the smaller dimension (without ``energy``) takes the seeded block Krylov SVD of
    :func:`krylov.randomized_svd` (it iterates until the error stops falling, to ~1e-7, and falls back to
    the exact SVD when that would not be cheaper); otherwise the float64 Gram matrix (:func:`gram_svd`).
    """
    if energy is None and rank is not None and (rank + KRYLOV_OVERSAMPLE) * KRYLOV_RATIO <= min(m.shape):
        a, b, _ = krylov.randomized_svd(m.contiguous(), rank, oversample=KRYLOV_OVERSAMPLE,
                                         generator=torch.Generator().manual_seed(0))
        s = a.square().sum(dim=1).double()  # the singular values: A's rows are sqrt(s_i) v_i
        k = choose_rank(s.square(), tuple(m.shape), rank, None)
        a, b = a[:k], b[:, :k]
    else:
        s2, v, transposed = gram_svd(m)
        k = choose_rank(s2, tuple(m.shape), rank, energy)
        if k == 0:
            return m.new_zeros(0, m.shape[1]), m.new_zeros(m.shape[0], 0), 0.0
        vk, root = v[:, :k].to(m.dtype), s2[:k].sqrt().sqrt().to(m.dtype)  # (q, k), sqrt(s_i)
        mv = (m if not transposed else m.T) @ vk  # (p, k) = U_k S_k of M
        if not transposed:  # m = M: m ~ (M V_k) V_k^T
            a, b = root[:, None] * vk.T, mv / root[None, :]
        else:  # m^T = M: m ~ V_k (M V_k)^T
            a, b = (mv / root[None, :]).T.contiguous(), vk * root[None, :]
    if k == 0:
        return m.new_zeros(0, m.shape[1]), m.new_zeros(m.shape[0], 0), 0.0
    return a, b, relative_error(m, a, b)


def relative_error(m: Tensor, a: Tensor, b: Tensor) -> float:
    """||m - b @ a||_F / ||m||_F, by blocks of rows (accumulated in float64)."""
    err = norm = 0.0
    for r in range(0, m.shape[0], ROWS):
        block = m[r:r + ROWS]
        err += float(torch.addmm(block, b[r:r + ROWS], a, alpha=-1).double().square().sum())
        norm += float(block.double().square().sum())
    return (err / norm) ** 0.5 if norm > 0 else 0.0


# --- which weights ---------------------------------------------------------------------------------------

def module_kinds(path: Path, config: dict) -> tuple[dict[str, str], dict[str, list[str]]]:
    """``{module: "linear" | "conv1d" | "embedding"}`` for every such module of the model's architecture, and
    the modules whose weight is tied to another's (``{stored module: [tied modules]}``, e.g. an LM head tied
    to the input embeddings), from a skeleton built on the meta device (no weights)."""
    import transformers
    from transformers.pytorch_utils import Conv1D

    try:
        cfg = transformers.AutoConfig.from_pretrained(str(path))
        arch = (config.get("architectures") or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        with torch.device("meta"):
            model = cls(cfg) if cls is not None else transformers.AutoModel.from_config(cfg)
    except Exception as e:  # noqa: BLE001  (any failure to build the skeleton means the same to the user)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise PeftmergeError(f"{path}: cannot build its architecture from config.json ({first}); extraction needs "
                             "a transformers model folder") from None
    kinds, owner, tied = {}, {}, {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, torch.nn.Embedding):
            kinds[name] = "embedding"
        elif isinstance(mod, Conv1D):
            kinds[name] = "conv1d"
        elif isinstance(mod, torch.nn.Linear):
            kinds[name] = "linear"
        else:
            continue
        first = owner.setdefault(id(mod.weight), name)
        if first != name:
            tied.setdefault(first, []).append(name)
    return kinds, tied


def _selected(module: str, modules: list[str] | None) -> bool:
    """PEFT's target_modules rule: a name matches the module path or its last dotted components."""
    return modules is None or any(module == t or module.endswith("." + t) for t in modules)


def _open(ref, what: str) -> Checkpoint:
    path = resolve(ref)
    if not is_checkpoint(path):
        raise PeftmergeError(f"{ref}: not a full model folder (config.json + model*.safetensors); pass the "
                             f"{what} as a transformers model folder")
    return Checkpoint(path)


# --- driver ----------------------------------------------------------------------------------------------

def extract(finetuned: str | Path, base: str | Path, out: str | Path, *, rank: int | None = None,
            energy: float | None = None, modules: list[str] | str | None = None, dtype: str = "float32",
            task: str | None = None, serve_rank: str | int | None = None, overwrite: bool = False,
            progress: bool = True) -> dict:
    """Write to ``out`` a PEFT LoRA adapter of ``base`` whose update approximates ``finetuned - base``
    optimally per module (see the module docstring); returns the report (also in ``extract_report.json``).

    ``rank``: the largest rank per module; ``energy`` (0 < energy <= 1): the smallest rank per module that
    keeps this fraction of ||dW||^2 (with ``rank`` too: capped by it). ``modules``: module names or name
    suffixes (``q_proj,v_proj``; default: every changed Linear, Conv1D and Embedding weight). ``serve_rank``
    (``"vllm"`` or a rank): every module at one rank a serving engine loads, zero-padded or optimally truncated
    (:mod:`peftmerge.merge.serve`; the truncation error is ``serve_error`` in the report).
    """
    if rank is None and energy is None:
        raise PeftmergeError("give --rank R (the largest rank per module) or --energy E (e.g. 0.99), or both")
    if rank is not None and rank < 1:
        raise PeftmergeError(f"--rank must be >= 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise PeftmergeError(f"--energy must be in (0, 1], got {energy}")
    if dtype not in DTYPES:
        raise PeftmergeError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    serving = serve.parse(serve_rank)
    if isinstance(modules, str):
        modules = [m.strip() for m in modules.split(",") if m.strip()]
    modules = modules or None
    start = time.perf_counter()
    ft, bs = _open(finetuned, "fine-tuned model"), _open(base, "base model")
    out = atomic.check_output(out, [ft.path, bs.path], overwrite)
    try:
        kinds, tied = module_kinds(ft.path, ft.config)
        plan, skipped = _plan(ft, bs, kinds, modules)
        tensors, report_modules = {}, {}
        bar = tqdm(plan, desc="extract", unit="module", disable=not progress)
        for name, kind in bar:
            module = name.removesuffix(".weight")
            dw = ft.raw(name).float().sub_(bs.raw(name).float())  # (d_out, d_in); (num, dim) / (in, out) stored
            if kind != "linear":
                dw = dw.T  # LoRA's layout: embedding (dim, num), Conv1D (out, in)
            if not bool(dw.any()):
                skipped["unchanged"].append(module)
                continue
            if not bool(torch.isfinite(dw).all()):
                raise PeftmergeError(f"{name}: not finite (NaN/Inf) in {ft.path} or {bs.path}; fix the checkpoint or "
                                     "leave the module out with --modules")
            a, b, err = low_rank(dw, rank, energy)
            del dw
            a, b = a.to(DTYPES[dtype]).contiguous(), b.to(DTYPES[dtype]).contiguous()
            tensors[module] = (kind, a, b)
            report_modules[module] = {"kind": kind, "shape": [b.shape[0], a.shape[1]], "rank": a.shape[0],
                                      "relative_error": err}
            for other in tied.get(module, []):  # the same change, in the tied module's layout
                flip = (kinds[other] == "embedding") != (kind == "embedding")
                tensors[other] = (kinds[other], *((b.T.contiguous(), a.T.contiguous()) if flip else (a, b)))
                report_modules[other] = {**report_modules[module], "kind": kinds[other], "tied_to": module}
        bar.close()
        if not tensors:
            raise PeftmergeError(f"{ft.path}: no selected weight differs from {bs.path}; nothing to extract "
                                 "(check --modules, or that these are a base and its fine-tune)")
        served = None
        if serving is not None:  # one rank for every module, as the serving engines load adapters
            fitted, served = serve.fit_all({m: (a, b) for m, (_, a, b) in tensors.items()}, serving)
            for m, (a, b, cut) in fitted.items():
                tensors[m] = (tensors[m][0], a, b)
                report_modules[m].update(rank_extracted=report_modules[m]["rank"], rank=a.shape[0], serve_error=cut)
        report = _report(finetuned, base, rank, energy, modules, dtype, report_modules, skipped, start)
        if served:
            report["serve"] = served
        with atomic.atomic_dir(out, overwrite) as tmp:
            _write(tmp, tensors, ft, base, task or ft.path.resolve().name, report)
    finally:
        ft.close()
        bs.close()
    if skipped["not_lora"]:
        worst = max(skipped["not_lora"].items(), key=lambda kv: kv[1])
        log.warning("%d changed tensor(s) a LoRA cannot hold are not in the adapter (largest relative change: "
                    "%s %.2e); see %s", len(skipped["not_lora"]), worst[0], worst[1], REPORT)
    if skipped["not_in_base"]:
        log.warning("%d tensor(s) of %s are not in the base model and not in the adapter (e.g. %s); see %s",
                    len(skipped["not_in_base"]), finetuned, skipped["not_in_base"][0], REPORT)
    return report


def _plan(ft: Checkpoint, bs: Checkpoint, kinds: dict[str, str], modules: list[str] | None):
    """The weights to extract (FINETUNED's storage order) and what is left out, with one-line errors for a
    selected weight missing from BASE or of another shape."""
    plan, skipped = [], {"unchanged": [], "not_lora": {}, "not_in_base": []}
    matched = set()
    for name in ft.names():
        info = ft.tensors[name]
        module = name.removesuffix(".weight")
        kind = kinds.get(module) if name.endswith(".weight") else None
        if kind is not None and not _selected(module, modules):
            continue
        if name not in bs.tensors:
            if kind is not None and modules is not None:
                raise PeftmergeError(f"{bs.path}: has no tensor {name}; pass the base model {ft.path} was tuned from")
            skipped["not_in_base"].append(name)
            continue
        other = bs.tensors[name]
        if kind is not None and info.shape != other.shape:
            raise PeftmergeError(f"tensor {name} is {list(info.shape)} in {ft.path} but {list(other.shape)} in "
                                 f"{bs.path}; a LoRA cannot change a shape: leave it out with --modules")
        if kind is not None and info.dtype.is_floating_point and len(info.shape) == 2:
            plan.append((name, kind))
            matched.add(module)
        elif modules is None and info.dtype.is_floating_point and info.shape == other.shape:
            w0 = bs.raw(name).float()
            change = float((ft.raw(name).float() - w0).norm() / w0.norm().clamp(min=1e-30))
            if not math.isfinite(change):
                raise PeftmergeError(f"{name}: not finite (NaN/Inf) in {ft.path} or {bs.path}; fix the checkpoint")
            if change > 0:
                skipped["not_lora"][name] = change
    if modules is not None:
        unknown = [m for m in modules if not any(_selected(x, [m]) for x in matched)]
        if unknown:
            raise PeftmergeError(f"--modules {', '.join(unknown)}: no Linear, Conv1D or Embedding weight of "
                                 f"{ft.path} is called so; use module names such as q_proj,v_proj")
    return plan, skipped


def _report(finetuned, base, rank, energy, modules, dtype, per_module, skipped, start) -> dict:
    errs = [m["relative_error"] for m in per_module.values()]
    return {
        "kind": "extracted-adapter", "method": "extract", "finetuned": str(finetuned), "base_model": str(base),
        "params": {"rank": rank, "energy": energy, "modules": modules}, "dtype": dtype,
        "r": max(m["rank"] for m in per_module.values()), "modules": len(per_module),
        "relative_error_mean": sum(errs) / len(errs), "relative_error_max": max(errs),
        "seconds": round(time.perf_counter() - start, 3), "per_module": per_module,
        "unchanged": skipped["unchanged"], "not_lora": skipped["not_lora"], "not_in_base": skipped["not_in_base"],
    }


def _write(folder: Path, tensors: dict, ft: Checkpoint, base, task: str, report: dict) -> None:
    from safetensors.torch import save_file

    state = {}
    for name, (kind, a, b) in tensors.items():
        ka, kb = lora_keys(name, "embedding" if kind == "embedding" else "linear")
        state[ka], state[kb] = a, b
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    archs = ft.config.get("architectures") or []
    task_type = "CAUSAL_LM" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else None
    # scaling 1 everywhere (alpha = rank): the singular values are in the factors
    config = lora_config({n: a.shape[0] for n, (_, a, _) in tensors.items()}, base_model=str(base),
                         task_type=task_type, fan_in_fan_out=any(k == "conv1d" for k, _, _ in tensors.values()))
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    (folder / REPORT).write_text(json.dumps(report, indent=2))
    meta = {"task": task, "method": "extract", "mergeable": True, "base_model": str(base),
            "finetuned": report["finetuned"]}
    (folder / "peftmerge.json").write_text(json.dumps(meta, indent=2))
    recipe = {"method": "extract", "params": report["params"], "dtype": report["dtype"],
              "inputs": [{"path": report["finetuned"]}], "relative_error_max": report["relative_error_max"]}
    write_card(folder, kind="adapter", base_model=str(base), recipe=recipe,
               title=f"LoRA extracted from {ft.path.name} (rank {report['r']})")
