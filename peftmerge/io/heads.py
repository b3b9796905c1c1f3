"""Task heads kept by a merge: each input's ``modules_to_save`` (e.g. a classifier) under its task name.

A merge of classification adapters merges the LoRA task vectors and keeps every input's head, so each
task is evaluated with its own head (the protocol of the TIES and PCB papers)::

    model = PeftModel.from_pretrained(base, "merged/")   # carries the first input's head by default
    load_head(model, "merged/", "agnews")    # now the agnews classifier sits on the merged encoder
"""

from __future__ import annotations

import json
from pathlib import Path

from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from ..errors import PeftmergeError


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
    state = load_file(str(Path(folder) / heads[task]))
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    missing = [k for k in state if any(k.endswith(u) for u in getattr(result, "unexpected_keys", []))]
    if missing:
        raise PeftmergeError(f"{folder}: head tensors {missing} do not fit this model; load it on the base model "
                             "the adapters were trained on")
