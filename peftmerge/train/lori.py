"""LoRI: LoRA with Reduced Interference, Zhang et al. 2025 (arXiv:2504.07448; official code juzhengz/LoRI).

A LoRA update whose down-projection is a frozen random projection and whose up-projection is sparse under a
task mask (the paper's Section 2):

    dW_t = (alpha/r) (B_t ⊙ M_t) A,   A ~ the LoRA init (random, frozen),   M_t in {0, 1}^(d_out x r)

Random projections of different tasks are nearly orthogonal, and disjoint sparse masks keep the tasks' B
apart, so adapters interfere less when merged.

- **LoRI-D** (``density`` 1): A frozen, B dense.
- **LoRI-S** (``density`` < 1; the paper's default sparsity 0.9 = density 0.1): a first LoRI-D phase
  calibrates the mask, M = the ``density`` fraction of B's entries largest in magnitude *over the whole
  model* (one global threshold, the official ``extract_mask.py``'s default); then every trainable parameter
  goes back to its initial value (B to zero, the head to its init; A is the same frozen projection) and B is
  trained again with its gradient masked by M, so entries outside the mask stay exactly zero.

The output is a plain PEFT LoRA adapter (A, B with B ⊙ M), which every merge method and router takes.
Hyperparameters: ``r``, ``alpha``, ``density`` (paper: 0.1), ``calibration_steps`` (default: the same
schedule as the sparse phase, as the official scripts train LoRI-D for the full run). The official scripts
train the sparse phase at a 10x higher learning rate than the dense one; here both use ``lr``.
"""

from __future__ import annotations

import torch

from ..errors import PeftmergeError

B_KEY = "lora_B"
A_KEY = "lora_A"


def freeze_a(model) -> int:
    """Freeze every LoRA A (the random projection); the number of A matrices frozen."""
    n = 0
    for name, p in model.named_parameters():
        if f".{A_KEY}." in name:
            p.requires_grad_(False)
            n += 1
    if n == 0:
        raise PeftmergeError("lori: the model has no LoRA A matrices to freeze; check --target-modules")
    return n


def b_params(model) -> dict[str, torch.nn.Parameter]:
    """The LoRA B matrices by parameter name."""
    return {name: p for name, p in model.named_parameters() if f".{B_KEY}." in name}


def magnitude_masks(bs: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """Keep the ``density`` fraction of all entries of ``bs`` largest in |B|, under one global threshold.

    Exactly ``round(density * total)`` entries are kept (ties broken by position), so the sparsity of the
    output is the configured one."""
    flat = torch.cat([b.detach().abs().flatten().float() for b in bs.values()])  # (total,)
    keep = round(density * flat.numel())
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.topk(flat, keep, sorted=False).indices] = True
    masks, start = {}, 0
    for name, b in bs.items():
        masks[name] = chosen[start:start + b.numel()].view(b.shape).to(b.device)
        start += b.numel()
    return masks


def apply_masks(model, masks: dict[str, torch.Tensor]) -> list:
    """Zero B outside its mask and mask B's gradient (so Adam never moves a masked entry); the hook handles."""
    handles = []
    params = b_params(model)
    with torch.no_grad():
        for name, mask in masks.items():
            p = params[name]
            p.mul_(mask.to(p.dtype))
            handles.append(p.register_hook(lambda g, m=mask: g * m.to(g.dtype)))
    return handles


def trainable_snapshot(model) -> dict[str, torch.Tensor]:
    """A copy of every trainable parameter (to restart from after the calibration phase)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def restore(model, snapshot: dict[str, torch.Tensor]) -> None:
    """Put the parameters of ``snapshot`` back to its values."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in snapshot:
                p.copy_(snapshot[n])


def density_of(model) -> float:
    """Fraction of the B entries that are nonzero."""
    bs = list(b_params(model).values())
    return sum(int((b != 0).sum()) for b in bs) / sum(b.numel() for b in bs)


def calibrate(model, config, make_trainer) -> dict[str, torch.Tensor]:
    """Phase 1 (LoRI-D): train B dense, take the global magnitude mask of B, and restart every trainable
    parameter from its initial value. ``make_trainer(config)`` builds a Trainer for ``model`` without
    validation; the phase writes no checkpoint."""
    import dataclasses
    import tempfile

    start = trainable_snapshot(model)
    with tempfile.TemporaryDirectory(prefix="peftmerge-lori-") as tmp:
        phase = dataclasses.replace(config, max_steps=config.calibration_steps or config.max_steps,
                                    checkpoint_dir=tmp, early_stopping=None,
                                    extra={**config.extra, "save_strategy": "no"})
        make_trainer(phase).train()
    masks = magnitude_masks({n: p for n, p in b_params(model).items()}, config.density)
    restore(model, start)
    return masks
