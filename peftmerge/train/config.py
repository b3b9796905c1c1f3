"""The settings of one training run (``peftmerge train``): one documented dataclass."""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..errors import PeftmergeError

SHAPES = ("text2text", "classify")
KEEP = ("last", "best")
EVAL_ROWS = (32, 500)  # bounds of the default evaluation sample
EVAL_SHARE = 0.25  # evaluated rows per trained row: a forward pass is ~1/3 of a training step, so ~8% of the run


@dataclass
class TrainConfig:
    """Everything ``peftmerge train`` needs; the CLI options map one-to-one onto these fields."""

    # --- what to train on -------------------------------------------------------------------
    model: str = ""
    """Base model: a local folder, a Hub id (read through the cache; ``HF_HUB_OFFLINE`` honoured), or a
    ``.gguf`` file (transformers' GGUF loading dequantizes it)."""
    data: str = ""
    """Training rows: a ``.jsonl``/``.json``/``.csv``/``.parquet`` file, a ``datasets`` folder
    (``save_to_disk``), or a task folder holding ``train.jsonl`` (+ ``validation.jsonl``, ``task.json``)."""
    task: str = ""
    """Task name, stored in ``peftmerge.json`` and used by merge and routing. Default: the name of the task folder
    given as ``data`` (or holding the data file), else the data file's name without its suffix."""
    out: str = ""
    """Output folder for the adapter; written atomically."""
    validation: str | None = None
    """Validation rows (same formats). Default: ``validation.jsonl`` of a task folder, else ``val_fraction``."""
    val_fraction: float = 0.0
    """Hold out this fraction of the training rows for validation when no validation file is given."""
    gguf_file: str | None = None
    """GGUF file name inside the ``model`` folder (or pass the ``.gguf`` path as ``model``)."""
    shape: str | None = None
    """``text2text`` (causal LM, loss on the completion) or ``classify`` (a sequence-classification head).
    Default: ``classify`` for labelled rows on a model that cannot generate, else ``text2text``."""
    labels: list[str] | None = None
    """Label names in order. Default: ``labels`` of a ``task.json`` beside the data, else sorted unique labels."""
    template: str | None = None
    """Prompt template for labelled rows in text2text, with ``{text}``, ``{text_pair}``, ``{labels}``, ``{task}``."""
    max_samples: int | None = None
    """Use at most this many training rows (a random subset, by ``seed``)."""
    max_eval_samples: int | None = None
    """Evaluate on at most this many validation rows. Default: a quarter of the rows the run trains on (steps x
    batch x grad_accum; divided by 1 + the number of labels when labels are scored as words), between 32 and 500,
    so that evaluation costs under a tenth of the run (an evaluated row costs about a third of a trained one)."""
    eval_before: bool = False
    """Also evaluate before training (``eval_loss_before`` in the metrics)."""

    # --- method -------------------------------------------------------------------------------
    method: str = "lora"
    """PEFT method; see ``peftmerge.train.methods.names()``."""
    r: int = 16
    """LoRA rank."""
    alpha: float = 32.0
    """LoRA scaling numerator (``lora_alpha``); the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA)."""
    dropout: float = 0.05
    """LoRA dropout."""
    target_modules: list[str] | str | None = None
    """Modules to adapt: names, or ``"all-linear"``. Default: PEFT's choice for the architecture."""
    rslora: bool = False
    """Rank-stabilised LoRA scaling alpha/sqrt(r) (Kalajdzievski 2023)."""
    num_virtual_tokens: int = 20
    """Prompt tuning: number of soft-prompt tokens; LLaMA-Adapter: adapter length."""
    adapter_layers: int = 8
    """LLaMA-Adapter: number of top layers that get an adaption prompt."""
    density: float = 0.1
    """LoRI: fraction of B's entries its task mask keeps (the paper's sparsity 0.9 = density 0.1); 1.0 trains
    LoRI-D (A frozen, B dense)."""
    calibration_steps: int | None = None
    """LoRI: optimizer steps of the dense phase that calibrates the mask. Default: the same schedule as the
    sparse phase (``max_steps`` or ``epochs``)."""
    teacher_prompt: str | None = None
    """Context distillation: a text file with the prompt (instructions, demonstrations) the teacher sees
    before every input and the student learns to do without."""

    # --- optimisation -------------------------------------------------------------------------
    lr: float = 2e-4
    """Peak learning rate."""
    epochs: float = 1.0
    """Training epochs (ignored when ``max_steps`` is set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    batch_size: int = 8
    """Per-device batch size."""
    grad_accum: int = 1
    """Gradient accumulation steps."""
    max_length: int = 512
    """Longest tokenized example; longer prompts are cut in the middle, completions at the end."""
    seed: int = 42
    """Seed for shuffling and sampling (and the initialisation, unless ``init_seed`` is given)."""
    init_seed: int | None = None
    """Seed for the initial LoRA factors and classification head. Default: derived from ``seed`` and ``task``, so
    that adapters of different tasks trained with one ``seed`` start from different random factors A. Adapters
    that start from the same A keep nearly the same row space (A moves little in training), so their task
    vectors overlap and interfere when merged."""
    scheduler: str = "linear"
    """Learning-rate schedule (transformers' ``lr_scheduler_type``: linear, cosine, constant, ...)."""
    warmup_ratio: float = 0.0
    """Fraction of steps for linear warmup."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    train_on_inputs: bool = False
    """Compute the loss on the prompt too (default: completion only)."""
    packing: bool = False
    """Pack several short examples into one ``max_length`` sequence (text2text only)."""
    eval_steps: int | None = None
    """Evaluate (and checkpoint) every N steps during training. Default: no evaluation during training (one after
    it), unless ``keep="best"`` or ``early_stopping`` needs them: then each epoch, or 5 times over ``max_steps``."""
    keep: str = "last"
    """Which weights are saved: ``last`` (the final step) or ``best`` (the checkpoint with the best validation
    accuracy, or loss for text2text, among the evaluations during training)."""
    early_stopping: int | None = None
    """Stop after this many evaluations without improvement (needs validation; keeps the best checkpoint)."""
    logging_steps: int = 10
    """Log the training loss every N steps."""
    resume: bool = False
    """Resume from the last checkpoint in ``checkpoint_dir``."""
    checkpoint_dir: str | None = None
    """Where checkpoints go. Default: ``.<out>.checkpoints`` beside the output; removed on success."""
    keep_checkpoints: bool = False
    """Keep ``checkpoint_dir`` after success."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, about 30% slower)."""
    dtype: str = "auto"
    """Weights dtype: ``auto`` (float32; bf16 autocast on a CUDA GPU that has it), float32, bfloat16, float16."""
    overwrite: bool = False
    """Replace an existing output folder."""
    extra: dict = field(default_factory=dict)
    """Extra ``transformers.TrainingArguments`` (e.g. ``{"deepspeed": "ds.json"}``), or that dict as JSON text
    (``--training-args``)."""

    def check(self) -> "TrainConfig":
        """Refuse missing, mistyped or impossible values with one line naming the field."""
        for name in ("model", "data", "out", "validation", "checkpoint_dir", "gguf_file"):
            value = getattr(self, name)
            if isinstance(value, Path):
                setattr(self, name, str(value))
        if isinstance(self.extra, str):
            self.extra = _json_object(self.extra)
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
                setattr(self, f.name, [str(v) for v in value])  # YAML labels may be numbers: 0, 1
            _check_type(f.name, getattr(self, f.name), str(f.type))
        if not self.task and self.data:
            from .data import default_task_name

            self.task = default_task_name(self.data)
        for name in ("model", "data", "task", "out"):
            if not getattr(self, name):
                raise PeftmergeError(f"missing {name!r}: pass --{name.replace('_', '-')} (or set it in the YAML task)")
        if self.shape is not None and self.shape not in SHAPES:
            raise PeftmergeError(f"shape {self.shape!r} is unknown; use one of {', '.join(SHAPES)}")
        if self.keep not in KEEP:
            raise PeftmergeError(f"keep {self.keep!r} is unknown; use one of {', '.join(KEEP)}")
        _in_range("val_fraction", self.val_fraction, 0.0, 1.0, high_open=True)
        _in_range("dropout", self.dropout, 0.0, 1.0, high_open=True)
        _in_range("warmup_ratio", self.warmup_ratio, 0.0, 1.0, high_open=True)
        _in_range("weight_decay", self.weight_decay, 0.0)
        if not 0.0 < self.density <= 1.0:
            raise PeftmergeError(f"density {self.density} is out of range: must be in (0, 1] (LoRI keeps this "
                                 "fraction of B; 0.1 is the paper's)")
        for name in ("r", "batch_size", "grad_accum", "max_length", "num_virtual_tokens", "adapter_layers",
                     "logging_steps"):
            if getattr(self, name) < 1:
                raise PeftmergeError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_samples", "max_eval_samples", "eval_steps", "early_stopping",
                     "calibration_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise PeftmergeError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise PeftmergeError(f"seed must be >= 0, got {self.seed}")
        for name in ("lr", "alpha", "epochs"):
            if not getattr(self, name) > 0:
                raise PeftmergeError(f"{name} must be > 0, got {getattr(self, name)}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        return self

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "TrainConfig":
        """Build from a mapping (a YAML task); unknown keys are refused with the valid ones listed."""
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise PeftmergeError(f"{where}: unknown key(s) {', '.join(bad)}; valid keys: {', '.join(sorted(known))}")
        return cls(**d)

    @property
    def keeps_best(self) -> bool:
        """Whether the best checkpoint is kept (``keep="best"``, or early stopping, which needs it)."""
        return self.keep == "best" or bool(self.early_stopping)

    def resolved_init_seed(self) -> int:
        """``init_seed``, or ``seed`` mixed with the task name (crc32) when it is not given."""
        if self.init_seed is not None:
            return int(self.init_seed)
        return (int(self.seed) * 1_000_003 + zlib.crc32(self.task.encode())) % 2**31

    @property
    def checkpoints(self) -> Path:
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir)
        out = Path(self.out)
        return out.parent / f".{out.name}.checkpoints"


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise PeftmergeError(f"--training-args {text!r} is not a JSON object; e.g. '{{\"deepspeed\": \"ds.json\"}}'")
    return value


_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "dict": (dict,)}


def _check_type(name: str, value, annotation: str) -> None:
    """``value`` fits the field's annotation (``int``, ``float | None``, ``list[str] | str | None``, ...); finite."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None and "None" in kinds:
        return
    for k in kinds:
        if k.startswith("list"):
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return
            continue
        types = _TYPES.get(k)
        if types and isinstance(value, types) and (k == "bool" or not isinstance(value, bool)):
            if isinstance(value, float) and not math.isfinite(value):
                raise PeftmergeError(f"{name} {value} is not a finite number")
            return
    want = " or ".join("a list of strings" if k.startswith("list") else f"{'an' if k == 'int' else 'a'} {k}"
                       for k in kinds if k != "None")
    raise PeftmergeError(f"{name} {value!r} must be {want} (it is a {type(value).__name__}); fix the option or the "
                         "YAML value")


def _in_range(name: str, value: float, low: float, high: float | None = None, high_open: bool = False) -> None:
    if not (value >= low and (high is None or (value < high if high_open else value <= high))):
        bound = f"[{low}, {high}{')' if high_open else ']'}" if high is not None else f">= {low}"
        raise PeftmergeError(f"{name} {value} is out of range: must be in {bound}" if high is not None
                             else f"{name} {value} must be {bound}")
