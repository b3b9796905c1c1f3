"""Task heads kept by a merge: each input's ``modules_to_save`` (e.g. a classifier) under its task name.

A merge of classification adapters merges the LoRA task vectors and keeps every input's head, so each
task is evaluated with its own head (the protocol of the TIES and PCB papers)::

    model = load_merged(base, "merged/", "agnews")   # the merged LoRA with agnews' classifier

``PeftModel.from_pretrained(base, "merged/")`` also works: it carries the first input's head.
``load_head`` switches a loaded model to another task's head of the same shape; ``head_state`` and
``load_plain_head`` serve a plain model (no PEFT wrapper) patched with merged weights, as search and routing use.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from ..errors import PeftmergeError
from .adapter import PREFIX
from .meta import read_meta


def head_tasks(folder: str | Path) -> dict[str, str]:
    """{task: head file} of a merged adapter folder (empty when it has no heads)."""
    meta = Path(folder) / "peftmerge.json"
    if not meta.exists():
        return {}
    return json.loads(meta.read_text()).get("heads", {})


def load_head(model, folder: str | Path, task: str, adapter_name: str = "default") -> None:
    """Put ``task``'s head into a ``PeftModel`` loaded from the merged adapter ``folder``."""
    heads = head_tasks(folder)
    if task not in heads:
        raise PeftmergeError(f"{folder}: no head for task {task!r}; it has heads for: {', '.join(heads) or 'none'}")
    from peft import set_peft_model_state_dict  # (peft loads in seconds: only where a model is built)

    state = load_file(str(Path(folder) / heads[task]))
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    missing = [k for k in state if any(k.endswith(u) for u in getattr(result, "unexpected_keys", []))]
    if missing:
        raise PeftmergeError(f"{folder}: head tensors {missing} do not fit this model; load it on the base model "
                             "the adapters were trained on")


def load_merged(base_model, folder: str | Path, task: str | None = None, adapter_name: str = "default"):
    """``PeftModel`` of the merged adapter ``folder`` on ``base_model`` with ``task``'s head.

    Works when the tasks' heads differ in shape (e.g. 2 vs 4 labels): the LoRA tensors and that task's
    head are loaded together, so the first input's default head is never forced onto the model.
    """
    from peft import PeftConfig, PeftModel, set_peft_model_state_dict

    heads = head_tasks(folder)
    if task is None or not heads:
        return PeftModel.from_pretrained(base_model, str(folder), adapter_name=adapter_name)
    if task not in heads:
        raise PeftmergeError(f"{folder}: no head for task {task!r}; it has heads for: {', '.join(heads)}")
    config = PeftConfig.from_pretrained(str(folder))
    config.inference_mode = True
    model = PeftModel(base_model, config, adapter_name=adapter_name)
    state = load_file(str(Path(folder) / "adapter_model.safetensors"))
    state.update(load_file(str(Path(folder) / heads[task])))
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    if result.unexpected_keys:
        raise PeftmergeError(f"{folder}: tensors {result.unexpected_keys[:3]} do not fit this model; load it on the "
                             "base model the adapters were trained on")
    return model


def head_state(adapter) -> dict:
    """An adapter's task head (its ``modules_to_save``, or ``heads/<task>`` of a merged adapter) under the plain
    model's names (``classifier.weight``, ...)."""
    heads = read_meta(adapter.path).get("heads") or {}
    folder = adapter.path if adapter.path.is_dir() else adapter.path.parent
    state = load_file(str(folder / heads[adapter.task])) if adapter.task in heads else adapter.heads()
    return {k.removeprefix(PREFIX).replace(".modules_to_save.default", "").replace(".original_module", ""): v
            for k, v in state.items()}


def load_plain_head(model, adapter) -> None:
    """Put an input adapter's saved head (:func:`head_state`) on a plain model."""
    try:
        result = model.load_state_dict(head_state(adapter), strict=False)
    except RuntimeError:  # shape mismatch
        raise PeftmergeError(f"{adapter.path}: its head does not fit a model with the task's label count; check "
                             "the adapter's peftmerge.json labels") from None
    if result.unexpected_keys:
        raise PeftmergeError(f"{adapter.path}: head tensors {result.unexpected_keys[:3]} do not fit the model; "
                             "search on the base model the adapters were trained on")
