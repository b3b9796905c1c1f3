"""Full merged models: every weight becomes W0 + merged(task vectors), streamed one tensor at a time.

Inputs are LoRA adapters of BASE (task vector dW = s B A of each adapted module, transposed for
embeddings and ``fan_in_fan_out`` Conv1D so it has the weight's layout) or full fine-tuned checkpoints
of BASE (task vector theta_i - theta_0 of every floating tensor, as mergekit does), in any mix. For each
tensor of BASE, in storage order:

    merged  = method(dW_1, ..., dW_n)     # float32; linear methods as sum_i c_i dW_i without a stack
    W       = W0 + merged                 # written in --dtype (default: the tensor's own dtype)

tensors no input changes are copied. A YAML recipe of one of mergekit's methods merges each tensor with
mergekit's definition instead, its weights and parameters resolved for that tensor (gradients over the
layers, filters by name: :mod:`peftmerge.merge.mergekit_recipe`). Memory: one tensor from each input (plus
the next one, read ahead on a background thread while this one is merged); the output goes straight to its
shard file.
Sparsifying methods act on the tensor as stored (rows are the weight's rows); DARE masks are seeded
with the module name as in the adapter path, so on Linear modules a full merge of LoRA inputs equals
``merge_and_unload`` of the merged adapter (at full rank). With ``space`` core or knots (LoRA inputs only) each
adapted weight is W0 + the merge in that space (:func:`peftmerge.merge.execute.in_space`), exactly the adapter
output of the same space merged into W0; biases merge in full space.
"""

from __future__ import annotations

import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import PeftmergeError
from ..io import atomic
from ..io.adapter import LoraAdapter
from ..io.card import write_card
from ..io.checkpoint import Checkpoint, is_checkpoint
from ..io.hub import resolve
from ..io.meta import file_sha256
from ..io.model_writer import ShardedWriter, Slot, copy_model_files, parse_size, update_config
from . import execute, registry, tied, vocab
from .mergekit_recipe import MergekitRecipe, layer_positions
from .plan import open_inputs
from .recipe import Recipe

log = logging.getLogger(__name__)
DEFAULT_SHARD_SIZE = "5GB"


def _resolve(ref: str | Path) -> Path:
    """A local model folder, or a Hub id resolved through the cache (``HF_HUB_OFFLINE`` honoured)."""
    path = resolve(ref)
    if not path.exists():
        raise PeftmergeError(f"{ref}: no such model folder; pass a local folder with config.json and "
                             "model*.safetensors")
    return path


@dataclass
class Source:
    """One input of a full merge: a LoRA adapter or a full fine-tuned checkpoint of BASE."""

    path: Path
    task: str
    adapter: LoraAdapter | None = None
    checkpoint: Checkpoint | None = None
    targets: dict[str, tuple[str, bool]] = field(default_factory=dict)  # tensor -> (module, transpose)
    bias_targets: dict[str, str] = field(default_factory=dict)  # bias tensor -> module whose lora_B.bias changes it

    def adapts(self, name: str) -> bool:
        """A LoRA input changes tensor ``name``: a LoRA weight, a lora_bias bias or a trained bias."""
        return name in self.targets or name in self.bias_targets or name in self.adapter.biases

    def changes(self, name: str, base: Checkpoint) -> bool:
        if self.adapter is not None:
            return self.adapts(name)
        return base.tensors[name].dtype.is_floating_point

    def task_vector(self, name: str, w0: torch.Tensor | None, raw: torch.Tensor | None) -> torch.Tensor | None:
        """This input's task vector for tensor ``name`` (float32, the weight's layout), or None if zero. A LoRA
        input's biases: s * lora_B.bias (lora_bias) plus b_i - b0 (a trained bias, bias="all"/"lora_only")."""
        if self.adapter is None:
            return torch.sub(raw, w0, out=torch.empty_like(w0))
        if not self.adapts(name):
            return None
        if name in self.targets:
            module, transpose = self.targets[name]
            delta = self.adapter.delta(module)
            return delta.T if transpose else delta
        delta = torch.zeros(w0.shape)
        if name in self.bias_targets:
            delta += self.adapter.bias_delta(self.bias_targets[name])
        if name in self.adapter.biases:
            delta += self.adapter.bias(name) - w0.float()
        return delta


def _lora_targets(adapter: LoraAdapter, base: Checkpoint) -> dict[str, tuple[str, bool]]:
    """Map each adapted module to BASE's weight tensor; the layouts must agree."""
    if adapter.head_keys:
        raise PeftmergeError(f"{adapter.path}: has modules_to_save tensors ({adapter.head_keys[0]}, ...); a full "
                             "merged model has no place for per-task heads, merge into an adapter instead (no --base)")
    fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))
    targets = {}
    for module, m in adapter.modules.items():
        name = f"{module}.weight"
        info = base.tensors.get(name)
        if info is None:
            raise PeftmergeError(f"{adapter.path}: adapts {module}, but the base model {base.path} has no tensor "
                                 f"{name}; pass the base model this adapter was trained on")
        transpose = m.kind == "embedding" or fan_in_fan_out
        shape = (m.d_in, m.d_out) if transpose else (m.d_out, m.d_in)
        if tuple(info.shape) != shape:
            raise PeftmergeError(f"{adapter.path}: module {module} has an update of shape {list(shape)} but the base "
                                 f"model's {name} is {list(info.shape)}; pass the base model it was trained on")
        targets[name] = (module, transpose)
        if m.bias_key is not None:
            bias = base.tensors.get(f"{module}.bias")
            if bias is None:
                raise PeftmergeError(f"{adapter.path}: module {module} has a lora_bias update, but the base model "
                                     f"{base.path} has no tensor {module}.bias to add it to (PEFT cannot merge it "
                                     "either); merge it into an adapter instead (no --base)")
    for name in adapter.biases:
        info = base.tensors.get(name)
        if info is None or tuple(info.shape) != tuple(adapter.file.shape(adapter.biases[name])):
            raise PeftmergeError(f"{adapter.path}: has a trained bias {name} that the base model {base.path} "
                                 f"{'lacks' if info is None else 'has in another shape'}; pass the base model this "
                                 "adapter was trained on")
    return targets


def open_sources(inputs: list[str], base: Checkpoint, alpha: float | None, force: bool,
                 aliases: dict[str, str] | None = None) -> list[Source]:
    """Open every input as a LoRA adapter or a full checkpoint of ``base`` (shapes checked). ``aliases``: tied
    output tensors read as their input embedding where a checkpoint does not store them (:mod:`tied`)."""
    paths = [_resolve(p) for p in inputs]
    is_full = [is_checkpoint(p) for p in paths]
    lora = open_inputs([p for p, f in zip(paths, is_full) if not f], alpha=alpha, force=force, merges_biases=True) \
        if not all(is_full) else []
    sources, it = [], iter(lora)
    for path, full in zip(paths, is_full):
        if not full:
            a = next(it)
            sources.append(Source(path, a.task, adapter=a, targets=_lora_targets(a, base),
                                  bias_targets={f"{k}.bias": k for k, m in a.modules.items() if m.bias_key}))
            continue
        ck = Checkpoint(path)
        tied.alias(ck, aliases or {})
        for name, info in base.tensors.items():
            other = ck.tensors.get(name)
            if other is None:
                raise PeftmergeError(f"{path}: has no tensor {name} (the base model {base.path} has); "
                                     "pass fine-tunes of this base model")
            if other.shape != info.shape:
                raise PeftmergeError(f"{path}: tensor {name} has shape {list(other.shape)} but the base model's is "
                                     f"{list(info.shape)}; pass fine-tunes of this base model")
        extra = set(ck.tensors) - set(base.tensors)
        if extra:
            log.warning("%s: %d tensor(s) not in the base model are ignored (e.g. %s)", path, len(extra), min(extra))
        sources.append(Source(path, path.resolve().name, checkpoint=ck))
    return sources


class Workspace:
    """Flat buffers reused for every tensor. A fresh allocation per tensor costs as much as the math:
    the kernel faults in each new page, so on two cores buffers reused tensor after tensor halve the time."""

    def __init__(self):
        self._bufs: dict = {}

    def get(self, key, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = self._bufs[key] = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return buf[:nbytes].view(dtype).view(shape)

    def raw(self, key, ckpt: Checkpoint, name: str) -> torch.Tensor:
        info = ckpt.tensors[name]
        return ckpt.raw(name, out=self.get(key, (info.nbytes,), torch.uint8))


def _read(name: str, base: Checkpoint, sources: list[Source], changed: bool, ws: Workspace, slot: int):
    """The raw tensors of ``name`` (into buffer set ``slot``): BASE's, and each full checkpoint's if merged."""
    w0 = ws.raw(("raw", slot, -1), base, name)
    raws = [ws.raw(("raw", slot, i), s.checkpoint, name) if (changed and s.checkpoint is not None) else None
            for i, s in enumerate(sources)]
    return w0, raws


def _inputs(name: str, sources: list[Source], raws: list, w0_raw: torch.Tensor, factors: bool = False) -> list:
    """What :func:`execute.full` takes: each input's full tensor (``theta``), LoRA task vector, or None; with
    ``factors`` (a merge in Core Space or KnOTS') a LoRA weight's scaled factors (B, A) in the weight's layout."""
    out = []
    for src, raw in zip(sources, raws):
        if src.checkpoint is not None:
            out.append(("theta", raw))
        elif factors and name in src.targets:
            module, transpose = src.targets[name]
            a, b = src.adapter.scaled_factors(module)
            out.append(("factors", (a.T, b.T) if transpose else (b, a)))
        elif src.adapts(name):
            out.append(("delta", src.task_vector(name, w0_raw, raw)))
        else:
            out.append(None)
    return out


def _read_after(write, *args):
    if write is not None:
        write.exception()  # wait; a failed write is raised by the main loop
    return _read(*args)


def merge_tensor(name: str, w0_raw: torch.Tensor, raws: list, sources: list[Source], method: registry.Method,
                 weights: torch.Tensor, params: dict, thresholds, ws: Workspace,
                 dtype: torch.dtype | None = None, slot: int = 0, position: float = 0.0) -> torch.Tensor:
    """W0 + merged task vectors of one tensor (:func:`execute.full`), computed in float32 and written in ``dtype``
    (default: W0's) into workspace buffer ``slot``; checked finite. ``position``: the tensor's place in the layers
    (a YAML recipe's gradients)."""
    out = ws.get(("cast", slot), w0_raw.shape, dtype or w0_raw.dtype)
    ranges: list = []  # (min, max) of each block of the output: NaN and overflow show there

    def whole():  # W0 and the stacked task vectors, for the methods that need them whole
        w0 = ws.get("w0", w0_raw.shape).copy_(w0_raw)
        return w0, stacked(name, w0, raws, sources, ws.get("stack", (len(sources), *w0.shape)))

    ctx = execute.context(params, name.removesuffix(".weight"), thresholds)
    inputs = _inputs(name, sources, raws, w0_raw, params.get("space", "full") != "full")
    execute.full(method, name, inputs, w0_raw, weights, params, ctx, out, ranges, whole, position)
    _check_finite(name, ranges, raws, sources, out.dtype)
    return out


def stacked(name: str, w0: torch.Tensor, raws: list, sources: list[Source], out: torch.Tensor | None = None):
    """(n, *shape) task vectors of one tensor, zeros where an input does not change it."""
    deltas = torch.empty(len(sources), *w0.shape) if out is None else out
    for i, (src, raw) in enumerate(zip(sources, raws)):
        if src.checkpoint is not None:
            deltas[i].copy_(raw).sub_(w0)
        elif src.adapts(name):
            deltas[i].copy_(src.task_vector(name, w0, raw))
        else:
            deltas[i].zero_()
    return deltas


def _check_finite(name: str, ranges: list, raws: list, sources: list[Source], dtype: torch.dtype) -> None:
    """From the output's per-block (min, max) (which propagate NaN; overflow in ``dtype`` shows as inf);
    the slow search for the culprit only on failure."""
    limit = torch.finfo(dtype).max
    if all(math.isfinite(lo) and math.isfinite(hi) and max(-lo, hi) <= limit for lo, hi in ranges):
        return
    for src, raw in zip(sources, raws):
        if raw is not None and not torch.isfinite(raw).all():
            raise PeftmergeError(f"{src.path}: tensor {name} contains NaN or Inf; this checkpoint is broken, drop it")
    raise PeftmergeError(f"merged tensor {name} is not finite in {str(dtype)[6:]} (NaN/Inf in an input or overflow); "
                         "check the inputs or write with --dtype float32")


def combine_full(recipe: Recipe, method: registry.Method, params: dict, weights: list[float], *, base: str | Path,
                 out: Path, shard_size: str | int | None = None, dtype: torch.dtype | None = None,
                 alpha: float | None = None, overwrite: bool = False, force: bool = False,
                 progress: bool = True) -> dict:
    """Merge ``recipe.inputs`` (LoRA adapters and/or full checkpoints) onto ``base``; write a model to ``out``."""
    if recipe.rank is not None:
        raise PeftmergeError("--rank applies to adapter outputs; a full merged model (--base) has no rank")
    if method.exact_concat:
        raise PeftmergeError(f"{method.name} concatenates LoRA factors and has no full-model form; "
                             "use --method task_arithmetic (the same weighted sum) with --base")
    size = parse_size(shard_size or DEFAULT_SHARD_SIZE)
    base_path = _resolve(base)
    if not is_checkpoint(base_path):
        raise PeftmergeError(f"{base_path}: not a full model folder (config.json + model*.safetensors); "
                             "--base takes the base model, not an adapter")
    if recipe.base is not None and Path(str(base)).resolve() != Path(recipe.base).resolve():
        raise PeftmergeError(f"{recipe.file} sets base_model {recipe.base} but --base is {base}; give the base "
                             "model in one place")
    atomic.check_output(out, [base_path] + [Path(p) for p in recipe.inputs], overwrite)
    ckpt = Checkpoint(base_path)
    pairs = tied.tied_pairs(ckpt)
    aliases = {out_name: inp for out_name, inp in (pairs or {}).items() if out_name not in ckpt.tensors}
    tied.alias(ckpt, aliases)
    sources = open_sources(recipe.inputs, ckpt, alpha, force, aliases)
    checkpoint = next((s.path for s in sources if s.checkpoint is not None), None)
    if checkpoint is not None and params.get("space", "full") != "full":
        raise PeftmergeError(f"{checkpoint}: a full checkpoint has no LoRA factors to merge in space {params['space']}; "
                             "drop --space (full space), or merge LoRA adapters only")
    if pairs is None:
        tied.refuse_unknown(sources, base_path)
        pairs = {}
    untied = [o for o, i in pairs.items() if not tied.changes_both_alike(sources, o, i)]
    for o in set(aliases) - set(untied):  # stays tied: written once, as the input embedding
        for c in [ckpt] + [s.checkpoint for s in sources if s.checkpoint is not None]:
            c.tensors.pop(o, None)
        for s in sources:
            s.targets.pop(o, None)
    names = ckpt.names()
    changed = {n: any(s.changes(n, ckpt) for s in sources) for n in names}
    if not any(changed.values()):
        raise PeftmergeError("no input changes any tensor of the base model; check the inputs")
    positions = {}
    if isinstance(method, MergekitRecipe):
        weights_t = None
        if method.spec.name == "linear":  # a weighted sum of the models themselves: every tensor, the base's too
            changed = {n: ckpt.tensors[n].dtype.is_floating_point for n in names}
        positions = layer_positions(names)
        for n in names:  # every setting resolved once up front: a missing weight fails before anything is written
            if changed[n]:
                method.at(n, positions[n])
    else:
        weights_t = torch.tensor(weights, dtype=torch.float32)
    tokenizer = vocab.output_tokenizer(recipe, base_path, sources)  # a recipe's tokenizer_source, checked
    slots = [Slot(n, dtype if (dtype is not None and ckpt.tensors[n].dtype.is_floating_point)
                  else ckpt.tensors[n].dtype, ckpt.tensors[n].shape) for n in names]

    ws = Workspace()
    merged_names = [n for n in names if changed[n]]
    thresholds = execute.global_thresholds(params, len(sources), lambda: (stacked(n, *_prepared(n, ckpt, sources, ws))
                                                                         for n in merged_names))

    start = time.perf_counter()
    bar = tqdm(total=sum(s.nbytes for s in slots), unit="B", unit_scale=True, desc=f"merge ({method.name})",
               disable=not progress)
    pool = ThreadPoolExecutor(max_workers=1)  # reads the next tensor while this one is merged
    io = ThreadPoolExecutor(max_workers=1)  # writes the last merged tensor while this one is merged
    try:
        with atomic.atomic_dir(out, overwrite=overwrite) as tmp, execute.single_threaded_caller():
            writer = ShardedWriter(tmp, slots, size)
            written = None  # the write in flight
            try:
                pending = pool.submit(_read, names[0], ckpt, sources, changed[names[0]], ws, 0)
                for k, slot in enumerate(slots):
                    w0, raws = pending.result()
                    if k + 1 < len(names):  # double buffered: the next read fills the other buffer set, once
                        # the write of tensor k - 1 (which may be that buffer set's own base tensor) is done
                        pending = pool.submit(_read_after, written, names[k + 1], ckpt, sources,
                                              changed[names[k + 1]], ws, (k + 1) % 2)
                    if changed[slot.name]:
                        result = merge_tensor(slot.name, w0, raws, sources, method, weights_t, params, thresholds,
                                              ws, slot.dtype, k % 2, positions.get(slot.name, 0.0))
                    elif w0.dtype != slot.dtype:
                        result = ws.get(("cast", k % 2), w0.shape, slot.dtype).copy_(w0)
                    else:
                        result = w0
                    if written is not None:
                        written.result()
                    written = io.submit(writer.write, slot.name, result)
                    del w0, raws, result
                    bar.update(slot.nbytes)
                    bar.set_postfix_str(f"{k + 1}/{len(slots)} tensors", refresh=False)
                written.result()
                writer.close()
            finally:
                io.shutdown(wait=True, cancel_futures=True)  # nothing writes into OUT's temp folder after this
                writer.abort()
            report = _report(recipe, method, params, weights, base, sources, changed, writer, slots, dtype, start)
            report["untied"] = untied
            copy_model_files(base_path, tmp, dtype)
            if untied:
                update_config(tmp, {"tie_word_embeddings": False})
            vocab.copy_tokenizer(tokenizer, base_path, tmp)
            _write_metadata(tmp, report, base)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        io.shutdown(wait=True, cancel_futures=True)
        bar.close()
        ckpt.close()
        for s in sources:
            if s.checkpoint is not None:
                s.checkpoint.close()
    return report


def _prepared(name: str, ckpt: Checkpoint, sources: list[Source], ws: Workspace):
    w0, raws = _read(name, ckpt, sources, True, ws, 0)
    return name, w0.float(), raws, sources


def _report(recipe, method, params, weights, base, sources, changed, writer, slots, dtype, start) -> dict:
    inputs = []
    for s in sources:
        if s.adapter is not None:
            inputs.append({"path": str(s.path), "kind": "lora", "task": s.task, "sha256": file_sha256(s.adapter.file.path)})
        else:  # hashing whole checkpoints would cost more than the merge; sizes identify the files
            inputs.append({"path": str(s.path), "kind": "full", "task": s.task, "bytes": s.checkpoint.nbytes})
    merged = [n for n, c in changed.items() if c]
    return {
        "kind": "merged-model", "method": method.name, "params": params, "weights": weights, "base_model": str(base),
        "dtype": str(dtype)[6:] if dtype is not None else "as base", "inputs": inputs,
        "tensors_merged": len(merged), "tensors_copied": len(changed) - len(merged),
        "bytes_written": sum(s.nbytes for s in slots), "shards": writer.files,
        "seconds": round(time.perf_counter() - start, 3), "merged_tensors": merged,
    }


def _write_metadata(folder: Path, report: dict, base) -> None:
    (folder / "merge_report.json").write_text(json.dumps(report, indent=2))
    tasks = [i["task"] for i in report["inputs"]]
    (folder / "peftmerge.json").write_text(json.dumps({"kind": "merged-model", "tasks": tasks,
                                                       "base_model": str(base)}, indent=2))
    recipe = {k: report[k] for k in ("method", "params", "weights", "dtype")}
    recipe["inputs"] = [{k: v for k, v in i.items() if k != "task"} for i in report["inputs"]]
    write_card(folder, kind="merged-model", base_model=str(base), recipe=recipe,
               title=f"{report['method']} merge of {', '.join(tasks)}")
