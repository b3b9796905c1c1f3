"""The grams file (``peftmerge grams`` writes it, data-aware merges such as RegMean read it): one (d_in, d_in)
float32 Gram matrix per task and module, named ``TASK/MODULE``, in a safetensors file whose metadata records the
tasks, token counts, data files and each adapter's sha256."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import PeftmergeError
from .meta import file_sha256

FORMAT = "peftmerge-grams"


class Grams:
    """A grams file opened lazily: :meth:`of` reads one module's matrices for the merge's inputs."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with safe_open(str(self.path), "pt") as f:
                meta = json.loads((f.metadata() or {}).get("peftmerge", "{}"))
                self.keys = set(f.keys())
        except Exception as e:  # noqa: BLE001 (OSError, JSON and safetensors' own error types)
            raise PeftmergeError(f"{self.path}: not a readable grams file ({e}); write one with `peftmerge grams`") \
                from None
        if meta.get("format") != FORMAT:
            raise PeftmergeError(f"{self.path}: not a peftmerge grams file; write one with `peftmerge grams`")
        self.meta = meta

    def check(self, adapters) -> None:
        """Every input's task measured, with this very adapter (same sha256)."""
        for a in adapters:
            if a.task not in self.meta["tasks"]:
                raise PeftmergeError(f"{self.path} has no Gram matrices for task {a.task} (it has "
                                     f"{', '.join(self.meta['tasks'])}); run `peftmerge grams` on these inputs")
            if self.meta["sha256"].get(a.task) != file_sha256(a.file.path):
                raise PeftmergeError(f"{self.path}: task {a.task}'s Gram matrices were measured with another "
                                     f"adapter than {a.ref}; run `peftmerge grams` again on these inputs")

    def of(self, module: str, tasks: list[str]) -> list[torch.Tensor] | None:
        """[G_i] of ``module`` in the order of ``tasks``; None when the file has none for it (e.g. embeddings)."""
        names = [f"{t}/{module}" for t in tasks]
        if not all(n in self.keys for n in names):
            return None
        with safe_open(str(self.path), "pt") as f:
            return [f.get_tensor(n).float() for n in names]
