"""Read LoRA adapters lazily, module by module.

An input is a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) or the
``.safetensors`` file itself (its sibling ``adapter_config.json`` is read when present). Each LoRA
module carries its own rank and scaling ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA, with
``rank_pattern`` / ``alpha_pattern`` applied), so that its task vector is exactly

    dW = s * B @ A                      # (d_out, d_in); for embeddings (embedding_dim, num_embeddings)

(the weight stores it transposed for embeddings and ``fan_in_fan_out`` Conv1D layers). Besides the factors an
adapter may carry bias changes: ``lora_bias=True`` adds ``s * lora_B.bias`` to the module's bias (a task vector,
read by :meth:`LoraAdapter.bias_delta`); ``bias="all"`` / ``"lora_only"`` save the trained biases themselves
(absolute values b_i, whose task vectors b_i - b0 need the base model: :meth:`LoraAdapter.bias`). Configs whose
update is not this (PiSSA-style inits, DoRA, ...) are refused by :mod:`peftmerge.io.lora_variants`.

Tensors are read only when asked for (``safe_open``), so peak memory stays at a few modules.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import PeftmergeError
from .lora_variants import check_lora_config, finite_alpha
from .meta import read_meta
from .safetensors_file import TensorFile

PREFIX = "base_model.model."
_FACTORS = {"lora_A": ("linear", "A"), "lora_B": ("linear", "B"),
            "lora_embedding_A": ("embedding", "A"), "lora_embedding_B": ("embedding", "B")}
SUPPORTED_TYPES = ("LORA",)


@dataclass
class LoraModule:
    """One adapted module: where its factors are and how to scale them."""

    name: str  # module path inside the base model, e.g. "model.layers.0.self_attn.q_proj"
    kind: str  # "linear" or "embedding"
    a_key: str
    b_key: str
    rank: int
    d_out: int
    d_in: int
    scaling: float = 1.0
    transposed: bool = False  # the weight is dW^T (d_in, d_out): embeddings and fan_in_fan_out (Conv1D) layers
    bias_key: str | None = None  # lora_B's bias (lora_bias=True): the bias changes by scaling * it

    @property
    def shape(self) -> tuple[int, int]:
        return (self.d_out, self.d_in)


@dataclass
class LoraAdapter:
    """A LoRA adapter on disk, read lazily."""

    path: Path  # the folder or file the user gave
    file: TensorFile
    config: dict
    modules: dict[str, LoraModule]
    task: str
    head_keys: list[str] = field(default_factory=list)  # modules_to_save tensors (classification heads)
    ref: str = ""  # what the user gave (a path or a Hub id), for the recipe
    biases: dict[str, str] = field(default_factory=dict)  # trained biases (bias="all"/"lora_only"): tensor -> key
    has_config: bool = True  # False: a bare .safetensors read with --alpha

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path") or None

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of module ``name`` in float32, unscaled."""
        m = self.modules[name]
        return self.file.get(m.a_key), self.file.get(m.b_key)

    def scaled_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, s * B)``: their product is the task vector."""
        a, b = self.factors(name)
        return a, b * self.modules[name].scaling

    def delta(self, name: str) -> torch.Tensor:
        """The task vector ``dW = s * B @ A`` of module ``name`` (float32)."""
        a, b = self.scaled_factors(name)
        return b @ a

    def bias_delta(self, name: str) -> torch.Tensor | None:
        """The bias task vector ``s * lora_B.bias`` of module ``name`` (float32), or None without lora_bias."""
        m = self.modules[name]
        return None if m.bias_key is None else self.file.get(m.bias_key) * m.scaling

    def bias(self, tensor: str) -> torch.Tensor:
        """A trained bias (``bias="all"``/``"lora_only"``) by its tensor name, e.g. ``model.x.q_proj.bias``:
        the value itself (float32), not a change."""
        return self.file.get(self.biases[tensor])

    def heads(self) -> dict[str, torch.Tensor]:
        """The ``modules_to_save`` tensors (task heads), under their saved key names."""
        return {k: self.file.get(k, dtype=None) for k in self.head_keys}


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's ``get_pattern_key``: a pattern key matches a module path as a dotted suffix regex."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _parse_key(key: str):
    """``base_model.model.<module>.lora_A[.<adapter>].weight`` -> (module, factor name, adapter name)."""
    parts = key.removeprefix(PREFIX).split(".")
    for i, p in enumerate(parts):
        if p in _FACTORS:
            rest = parts[i + 1:]
            if rest and rest[-1] == "bias":
                return ".".join(parts[:i]), p + ".bias", None
            if rest and rest[-1] == "weight":
                rest = rest[:-1]
            return ".".join(parts[:i]), p, (rest[0] if rest else None)
    return None


def _locate(path: Path, alpha: float | None) -> tuple[Path, dict | None]:
    """The tensor file and the config (None when absent) of an input path."""
    if not path.exists():
        raise PeftmergeError(f"{path}: no such file or directory; check the path")
    if path.is_dir():
        info = read_meta(path)
        if info.get("mergeable") is False:
            raise PeftmergeError(f"{path}: a {info.get('method', 'non-LoRA')} adapter; only LoRA adapters "
                                 "(lora, qlora, rsLoRA) can be merged as task vectors")
        file = path / "adapter_model.safetensors"
        if not file.exists():
            if (path / "adapter_model.bin").exists():
                raise PeftmergeError(f"{path}: only adapter_model.bin (pickle) found; re-save it with safetensors "
                                     "(PeftModel.save_pretrained(..., safe_serialization=True))")
            raise PeftmergeError(f"{path}: no adapter_model.safetensors in this folder; pass a PEFT adapter folder "
                                 "or a .safetensors file")
        cfg_path = path / "adapter_config.json"
    else:
        file = path
        cfg_path = path.parent / "adapter_config.json"
    config = None
    if cfg_path.exists():
        try:
            config = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise PeftmergeError(f"{cfg_path}: not valid JSON; fix or re-save the adapter config") from None
        if not isinstance(config, dict):
            raise PeftmergeError(f"{cfg_path}: not a PEFT adapter config (expected a JSON object)")
    return file, config


def _task_name(path: Path) -> str:
    task = read_meta(path).get("task")
    if task:
        return str(task)
    folder = path if path.is_dir() else path.parent
    if path.is_file() and path.stem not in ("adapter_model", "model"):
        return path.stem
    return folder.resolve().name


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _config_error(config: dict) -> str | None:
    """What makes an adapter config's scaling unusable (a wrong-typed or non-finite value), or None."""
    if config.get("lora_alpha") is not None and not _finite_number(config["lora_alpha"]):
        return f"lora_alpha {config['lora_alpha']!r} is not a finite number"
    if config.get("r") is not None and not (isinstance(config["r"], int) and not isinstance(config["r"], bool)):
        return f"r {config['r']!r} is not a whole number"
    for key in ("use_rslora", "use_dora"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            return f"{key} {config[key]!r} is not true or false"
    for key in ("alpha_pattern", "rank_pattern"):
        pattern = config.get(key)
        if pattern is not None and (not isinstance(pattern, dict) or not all(_finite_number(v)
                                                                               for v in pattern.values())):
            return f"{key} is not a mapping of module patterns to numbers"
    return None


def load_adapter(path: str | Path, alpha: float | None = None, merges_biases: bool = False) -> LoraAdapter:
    """Open a LoRA adapter (folder or ``.safetensors``). ``alpha`` is required when no config is found.
    ``merges_biases``: the caller merges bias changes (lora_bias, trained biases); other callers refuse adapters
    that have them, since applying the LoRA factors alone would be silently wrong."""
    path = Path(path)
    if alpha is not None and (not _finite_number(alpha) or alpha == 0):
        raise PeftmergeError(f"--alpha {alpha!r} must be a finite, non-zero number (the lora_alpha the adapters were "
                             "trained with)")
    file_path, config = _locate(path, alpha)
    if config is not None and (bad := _config_error(config)):
        raise PeftmergeError(f"{path}: adapter_config.json: {bad}; fix or re-save the adapter")
    tensors = TensorFile(file_path)
    if config is None:
        if alpha is None:
            raise PeftmergeError(
                f"{file_path}: no adapter_config.json beside it, so its LoRA scaling (alpha/r) cannot be known; "
                "pass --alpha A (the lora_alpha it was trained with)"
            )
        config = {"peft_type": "LORA", "lora_alpha": alpha}
        has_config = False
    else:
        has_config = True  # its own lora_alpha / alpha_pattern: --alpha is only for inputs without a config
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type not in SUPPORTED_TYPES:
        raise PeftmergeError(
            f"{path}: a {peft_type} adapter; only LoRA adapters (peft_type LORA, incl. QLoRA and rsLoRA) "
            "can be merged as task vectors"
        )
    check_lora_config(config, path)
    bias_mode = config.get("bias") or "none"
    if bias_mode not in ("none", "all", "lora_only"):
        raise PeftmergeError(f"{path}: bias={bias_mode!r} is not one of none, all, lora_only; fix adapter_config.json")
    to_save = [str(m) for m in (config.get("modules_to_save") or [])]

    found: dict[str, dict[str, str]] = {}
    kinds: dict[str, str] = {}
    names: set[str] = set()
    heads: list[str] = []
    lora_biases: dict[str, str] = {}
    biases: dict[str, str] = {}
    for key in tensors.keys():
        parsed = _parse_key(key)
        if parsed is None:
            if "lora_magnitude_vector" in key:
                raise PeftmergeError(f"{path}: has DoRA magnitude vectors ({key}); DoRA updates cannot be merged "
                                     "as task vectors; merge plain LoRA adapters")
            tensor = key.removeprefix(PREFIX)
            parts = tensor.split(".")
            owners = [".".join(parts[:i]) for i in range(1, len(parts))]  # every module the tensor is under
            if any(o == m or o.endswith("." + m) for o in owners for m in to_save):
                heads.append(key)
            elif tensor.endswith(".bias") and bias_mode != "none":
                biases[tensor.replace(".base_layer.bias", ".bias")] = key
            elif ".base_layer." not in tensor:  # base_layer.weight: the copy of W0 PEFT saves with embeddings
                heads.append(key)
            continue
        module, factor, adapter_name = parsed
        if factor.endswith(".bias"):
            if factor != "lora_B.bias":
                raise PeftmergeError(f"{path}: has a bias on {factor.removesuffix('.bias')} ({key}), which PEFT never "
                                     "writes; re-save the adapter with PEFT")
            lora_biases[module] = key
            continue
        if adapter_name:
            names.add(adapter_name)
        kind, side = _FACTORS[factor]
        found.setdefault(module, {})[side] = key
        kinds[module] = kind
    if len(names) > 1:
        raise PeftmergeError(f"{path}: holds several adapters ({', '.join(sorted(names))}); save each one on its own")

    rslora = bool(config.get("use_rslora"))
    lora_alpha = config.get("lora_alpha")
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    where = (file_path.parent / "adapter_config.json") if has_config else "--alpha"
    modules: dict[str, LoraModule] = {}
    for module, sides in found.items():
        if set(sides) != {"A", "B"}:
            missing = "B" if "A" in sides else "A"
            raise PeftmergeError(f"{path}: module {module} has no lora_{missing} tensor; the file is incomplete")
        a_shape, b_shape = tensors.shape(sides["A"]), tensors.shape(sides["B"])
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise PeftmergeError(f"{path}: module {module} has factors of shapes {list(b_shape)} @ {list(a_shape)} "
                                 "that do not multiply; only Linear and Embedding LoRA layers are supported")
        rank = a_shape[0]
        if rank == 0 or 0 in a_shape or 0 in b_shape:
            raise PeftmergeError(f"{path}: module {module} has empty factors (shapes {list(b_shape)} @ "
                                 f"{list(a_shape)}, rank {rank}); the file is broken: retrain or re-save it")
        a = _pattern_value(config.get("alpha_pattern"), module, lora_alpha)
        if a is None:
            a = rank  # no alpha anywhere and --alpha not given is caught above; configs always carry it
        a = finite_alpha(a, where, f"lora_alpha of {module}")
        if rank == 0:
            raise PeftmergeError(f"{path}: module {module} has rank 0; the file is incomplete")
        scaling = a / math.sqrt(rank) if rslora else a / rank
        kind = kinds[module]
        bias_key = lora_biases.pop(module, None)
        if bias_key is not None and tensors.shape(bias_key) != (b_shape[0],):
            raise PeftmergeError(f"{path}: {bias_key} has shape {list(tensors.shape(bias_key))}, not [{b_shape[0]}]; "
                                 "the file is corrupt")
        modules[module] = LoraModule(module, kind, sides["A"], sides["B"], rank, b_shape[0], a_shape[1],
                                     float(scaling), kind == "embedding" or fan_in_fan_out, bias_key)
    if lora_biases:
        raise PeftmergeError(f"{path}: {next(iter(lora_biases.values()))} has no lora_A/lora_B beside it; the file "
                             "is incomplete")
    with_bias = next((m.bias_key for m in modules.values() if m.bias_key), None) or next(iter(biases.values()), None)
    if with_bias and not merges_biases:
        raise PeftmergeError(f"{path}: changes biases too ({with_bias}; lora_bias or bias={bias_mode!r}), which only "
                             "`peftmerge combine` merges; retrain with bias='none' and lora_bias=false to use it here")
    if not modules:
        raise PeftmergeError(f"{path}: no LoRA tensors (lora_A/lora_B) found; is this a LoRA adapter?")
    return LoraAdapter(path=path, file=tensors, config=config, modules=modules, task=_task_name(path),
                       head_keys=heads, ref=str(path), biases=biases, has_config=has_config)
