"""Load what is evaluated: a base model (folder, Hub id from the local cache, or GGUF file; loaded by
:mod:`peftmerge.io.model_loader`), optionally with a LoRA adapter or a merged adapter (whose per-task heads are
swapped in with ``load_head``).

Models are cached by (adapter, kind, number of labels) so that each is loaded once per run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import PeftmergeError
from ..io import model_loader
from ..io.base_model import local_path
from ..io.heads import head_tasks, load_head, load_merged

log = logging.getLogger(__name__)


def check_adapter(adapter: str | Path) -> None:
    """An adapter folder that can be loaded safely: adapter_config.json (a JSON object) and safetensors weights
    with a sound header (pickle weights are never loaded)."""
    from ..io.safetensors_file import TensorFile

    folder = Path(adapter)
    if not folder.is_dir():
        raise PeftmergeError(f"{folder}: not an adapter folder; pass the folder written by train or combine")
    cfg = folder / "adapter_config.json"
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PeftmergeError(f"{folder}: no adapter_config.json; pass a PEFT adapter folder") from None
    except (ValueError, OSError):
        raise PeftmergeError(f"{cfg}: not valid JSON; fix or re-save the adapter") from None
    if not isinstance(config, dict):
        raise PeftmergeError(f"{cfg}: not a PEFT adapter config (expected a JSON object)")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        if (folder / "adapter_model.bin").exists():
            raise PeftmergeError(f"{folder}: only adapter_model.bin (pickle), which peftmerge never loads; re-save it "
                                 "with safetensors (PeftModel.save_pretrained(..., safe_serialization=True))")
        raise PeftmergeError(f"{folder}: no adapter_model.safetensors; pass a PEFT adapter folder")
    tensors = TensorFile(weights)
    for name in tensors.keys():
        tensors.get(name, dtype=None)  # refuses NaN and infinity: an adapter is small, reading it all is cheap


def base_config(base: str) -> dict:
    """The base model's config.json ({} for GGUF files and Hub ids not on disk)."""
    p = Path(local_path(base)) / "config.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def is_classifier(base: str) -> bool:
    """True when the base model itself carries a sequence-classification head (a full merged classifier)."""
    return any(a.endswith("ForSequenceClassification") for a in base_config(base).get("architectures") or [])


def load_tokenizer(base: str):
    return model_loader.load_tokenizer(*model_loader.resolve(base))


def load_model(base: str, kind: str, num_labels: int | None = None, adapter: str | Path | None = None,
               head_task: str | None = None):
    """``kind``: "causal" or "seqcls". The adapter (if any) is applied with PEFT; eval mode, float32.

    ``head_task``: for a merged adapter with per-task heads, the task whose head is put on the model.
    """
    src, gguf = model_loader.resolve(base)
    if kind == "seqcls" and num_labels is not None and adapter is None and is_classifier(base):
        num_labels = None  # a merged classifier brings its own head
    model = model_loader.load_model(src, gguf, "classify" if kind == "seqcls" else "text2text", num_labels=num_labels)
    if adapter is None:
        return model.eval()
    check_adapter(adapter)
    try:
        if head_task is not None:
            return load_merged(model, adapter, head_task).eval()
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    except (ValueError, TypeError, KeyError, RuntimeError) as e:  # a config PEFT refuses, tensors that do not fit
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise PeftmergeError(f"{adapter}: cannot load it onto {base} ({first}); check the adapter and its base "
                             "model") from None
    return model.eval()


class ModelCache:
    """One loaded model per (adapter, kind, num_labels); heads swapped per task for merged adapters."""

    def __init__(self, base: str):
        self.base = base
        self.models: dict = {}
        self._tok = None

    @property
    def tokenizer(self):
        if self._tok is None:
            self._tok = load_tokenizer(self.base)
        return self._tok

    def clear(self) -> None:
        self.models.clear()

    def get(self, kind: str, adapter=None, num_labels=None, head_task: str | None = None):
        key = (str(adapter) if adapter else None, kind, num_labels if kind == "seqcls" else None)
        if key not in self.models:
            self.models[key] = load_model(self.base, kind, num_labels, adapter, head_task)
        model = self.models[key]
        if head_task is not None:
            load_head(model, adapter, head_task)  # the head of this task (another task may have been loaded)
        return model


def adapter_has_head(adapter: str | Path) -> bool:
    """A single adapter that saved a head (``modules_to_save``), e.g. one trained with ``--shape classify``."""
    cfg = Path(adapter) / "adapter_config.json"
    if not cfg.is_file():
        return False
    return bool(json.loads(cfg.read_text()).get("modules_to_save")) and not head_tasks(adapter)
