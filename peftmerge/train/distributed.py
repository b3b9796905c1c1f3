"""Multi-process training (``torchrun``, ``accelerate launch``, DeepSpeed): what ``train`` adds to ``Trainer``.

``Trainer`` (through accelerate) already shards the batches (each process takes its own ``--batch-size``
rows of one shuffled order, so N processes train on a global batch of N x ``--batch-size``), averages the
gradients, and saves checkpoints from the main process only. Two things are ours:

- a launch on a machine without an accelerator must tell ``TrainingArguments`` to use the CPU (gloo);
  otherwise accelerate sees no distributed device and every process trains alone on all the data;
- the output folder is written once, by the global main process, after every process has finished.
"""

from __future__ import annotations

import os

import torch


def world_size() -> int:
    """Number of processes of the launch (``WORLD_SIZE``, set by torchrun / accelerate launch; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def has_accelerator() -> bool:
    """A GPU (or another torch accelerator) is usable in this process."""
    accel = getattr(torch, "accelerator", None)
    return bool(accel.is_available()) if accel is not None else torch.cuda.is_available()


def cpu_launch() -> bool:
    """A multi-process launch on a machine without an accelerator: train data-parallel on CPU processes."""
    return world_size() > 1 and not has_accelerator()


def is_main_process() -> bool:
    """The global main process of a launch (``RANK`` 0), or a plain single-process run."""
    return int(os.environ.get("RANK", "0")) == 0
