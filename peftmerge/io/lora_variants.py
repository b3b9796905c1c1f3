"""Which PEFT LoRA configurations peftmerge can read as task vectors, and one-line refusals for the others.

A LoRA adapter is merged as its task vector: the change it makes to the base model's weights W0 when PEFT
loads it, ``dW = s * B @ A`` per module (plus the bias changes, see :mod:`peftmerge.io.adapter`). That
holds for the LoRA variants whose initialisation leaves W0 untouched and whose forward pass is
``W0 x + s * B A x`` (PEFT 0.21: ``init_lora_weights`` True, False, ``"gaussian"``, ``"eva"``,
``"orthogonal"``, ``"mica"``; rsLoRA, rank and alpha patterns, VeLoRA's memory-saving backward, Megatron
layers). The others change the math and are refused here, before anything is read:

- inits that move W0 (PiSSA, CorDA, OLoRA, LoRA-GA: ``W0 - s B0 A0``; LoftQ: a quantized W0): their
  ``s B A`` is relative to that moved base. PEFT converts the first four into a plain LoRA of rank 2r when
  ``save_pretrained(..., path_initial_model_for_weight_conversion=INIT_DIR)`` is given the adapter saved
  right after initialisation (it then writes ``init_lora_weights: true``); such adapters are read normally;
- variants whose update is not ``s B A``: DoRA, aLoRA, QALoRA, KaSA, BD-LoRA, MonteCLoRA, Arrow routing,
  LoRA on raw parameters (``target_parameters``), replicated layers (``layer_replication``);
- trainable tokens (``trainable_token_indices``): stored as the new embedding rows, not as a LoRA update.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import PeftmergeError

# init_lora_weights values that leave W0 as it was (PEFT 0.21, tuners/lora/layer.py update_layer)
SAME_BASE = {"true", "false", "gaussian", "eva", "orthogonal", "mica"}
# inits that subtract s * B0 @ A0 from W0; PEFT's path_initial_model_for_weight_conversion converts them
CONVERTIBLE = ("pissa", "corda", "olora", "lora_ga")

CONVERT = ("save it converted to a plain LoRA: PeftModel.save_pretrained(OUT, "
           "path_initial_model_for_weight_conversion=INIT_DIR), INIT_DIR being the adapter saved right after "
           "initialisation")

# field -> why a set value makes the update something other than s * B @ A
UNSUPPORTED = {
    "use_dora": "DoRA rescales each column of W0 + s*B@A by a learned magnitude, so its update is not s*B@A; "
                "merge plain LoRA adapters",
    "alora_invocation_tokens": "aLoRA applies its update only from the invocation tokens on, so it has no single "
                               "task vector (PEFT cannot merge it either); merge plain LoRA adapters",
    "use_qalora": "QALoRA applies A to group-pooled inputs, so its update is not s*B@A; merge plain LoRA adapters",
    "kasa_config": "KaSA replaces the smallest singular components of W0 and scales B@A by learned singular values, "
                   "so its update is not s*B@A; merge plain LoRA adapters",
    "use_bdlora": "BD-LoRA stores block-diagonal factors that peftmerge does not read; merge plain LoRA adapters",
    "monteclora_config": "MonteCLoRA samples its factors around the learned ones, so it has no single s*B@A; "
                         "merge plain LoRA adapters",
    "arrow_config": "an Arrow configuration routes between several adapters; merge the task adapters themselves",
    "target_parameters": "LoRA on raw parameters (target_parameters, e.g. MoE experts) is not read by peftmerge; "
                         "merge adapters of Linear or Embedding modules",
    "layer_replication": "layer_replication adapts layers that the base model does not have (replicated ones); "
                         "merge adapters trained without it",
    "trainable_token_indices": "trainable tokens are stored as new embedding rows, not as a LoRA update, and "
                               "peftmerge does not merge them; retrain without trainable_token_indices "
                               "(or target the embedding with LoRA)",
}


def check_lora_config(config: dict, where: Path) -> None:
    """Refuse (one line naming ``where``) a config whose adapter is not the task vector s*B@A on W0."""
    for field, why in UNSUPPORTED.items():
        value = config.get(field)
        if value not in (None, False, [], {}, ""):
            raise PeftmergeError(f"{where}: {field}={_short(value)}: {why}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, bool) or (isinstance(init, str) and init.lower() in SAME_BASE):
        return
    name = str(init).lower()
    if name.startswith(CONVERTIBLE):
        raise PeftmergeError(f"{where}: init_lora_weights={init!r} moved the base weights (W0 - s*B0@A0), so s*B@A "
                             f"is not this adapter's task vector; {CONVERT}")
    if name == "loftq":
        raise PeftmergeError(f"{where}: init_lora_weights='loftq' trains against LoftQ's quantized copy of W0, so "
                             "s*B@A is not a task vector of the base model; merge plain LoRA or QLoRA adapters")
    raise PeftmergeError(f"{where}: init_lora_weights={init!r} is not an initialisation peftmerge knows to leave the "
                         f"base weights untouched ({', '.join(sorted(SAME_BASE))}); merge adapters "
                         "trained with one of those")


def finite_alpha(value, where: Path, what: str) -> float:
    """``value`` as a finite float, or a one-line error naming the config and the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PeftmergeError(f"{where}: {what} {value!r} is not a finite number; fix adapter_config.json")
    return float(value)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
