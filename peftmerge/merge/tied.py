"""Tied input and output embeddings (``tie_word_embeddings``) in a full merged model.

A tied model stores one matrix for its input embedding and its output layer (usually only the input
embedding's tensor is saved). PEFT applies an embedding LoRA in the embedding's forward, so the output layer of
the adapted model keeps W0, unless the adapter also adapts the output layer (``ensure_weight_tying=True``
gives it the same, tied, LoRA). Merged into the stored matrix, an embedding update would change both layers.
So for each tied pair:

- every input changes both layers the same way (full fine-tunes of the tied model, tied adapters, or adapters
  that touch neither): the pair stays tied and the merge is written once;
- otherwise the output is untied: the output layer becomes a tensor of its own, W0 plus the merge of each
  input's change to it (0 for an embedding-only LoRA), and the config says ``tie_word_embeddings: false``.
"""

from __future__ import annotations

import torch

from ..errors import PeftmergeError
from ..io.checkpoint import Checkpoint


def tied_pairs(base: Checkpoint) -> dict[str, str] | None:
    """{output layer's tensor: input embedding's tensor} that BASE ties (its model class's ``_tied_weights_keys``,
    when its config sets ``tie_word_embeddings``); {} for an untied model; None when the config ties them but
    transformers does not know the model class, so which tensors are tied is unknown."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(base.path))
    except (OSError, ValueError, KeyError):  # a model type transformers does not know
        return {} if base.config.get("tie_word_embeddings") is False else None
    if not getattr(config.get_text_config(), "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)):
        return {}
    classes = [getattr(transformers, name, None) for name in (getattr(config, "architectures", None) or [])]
    classes = [c for c in classes if c is not None]
    if not classes:
        return None
    keys = next((c._tied_weights_keys for c in classes if isinstance(getattr(c, "_tied_weights_keys", None), dict)),
                {})
    return {out: inp for out, inp in keys.items() if inp in base.tensors}


def refuse_unknown(sources, base) -> None:
    """BASE ties its embeddings to a layer transformers cannot name: refuse an embedding LoRA, whose merge into the
    shared weight would change that layer too."""
    for src in sources:
        embedding = src.adapter and next((k for k, m in src.adapter.modules.items() if m.kind == "embedding"), None)
        if embedding:
            raise PeftmergeError(f"{base}: its config ties the input and output embeddings, but transformers does not "
                                 f"know its model class, so which layer shares the weight that {src.path} adapts "
                                 f"({embedding}) is unknown; merge into an adapter instead (no --base)")


def alias(checkpoint: Checkpoint, pairs: dict[str, str]) -> None:
    """Let ``checkpoint`` read each output tensor it does not store as its tied input embedding."""
    for out, inp in pairs.items():
        if out not in checkpoint.tensors and inp in checkpoint.tensors:
            checkpoint.tensors[out] = checkpoint.tensors[inp]


def changes_both_alike(sources, out: str, inp: str) -> bool:
    """Every input changes the output tensor ``out`` exactly as it changes the input embedding ``inp``."""
    for src in sources:
        if src.adapter is None:
            ck = src.checkpoint
            if ck.tensors[out] is not ck.tensors[inp] and not torch.equal(ck.raw(out), ck.raw(inp)):
                return False
            continue
        a, b = src.adapts(inp), src.adapts(out)
        if a != b:
            return False
        if a and not torch.equal(src.task_vector(inp, None, None), src.task_vector(out, None, None)):
            return False
    return True
