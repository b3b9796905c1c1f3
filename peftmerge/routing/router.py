"""A router on disk: ``router.json`` (strategy, parameters, adapters, base model, embedder) +
``router.safetensors`` (prototypes / centroids / probe weights) + ``README.md`` (model card). No pickle.

Adapter paths are stored relative to the router folder when possible (and absolute as a fallback), so
a folder holding the router beside its adapters can be moved as a whole.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..card import write_card
from ..errors import PeftmergeError
from ..io.atomic import atomic_dir, check_output
from . import registry

FORMAT = "peftmerge-router"
CONFIG, TENSORS = "router.json", "router.safetensors"


@dataclass
class AdapterInfo:
    """One routed adapter, as the router records it."""

    task: str
    path: str  # absolute when built; resolved against the router folder when loaded
    shape: str = "text2text"  # "text2text" or "classify"
    labels: list[str] | None = None
    template: str | None = None


@dataclass
class Router:
    """A built router: which strategy, its parameters, the adapters it chooses among and its tensors."""

    strategy: str
    params: dict
    adapters: list[AdapterInfo]
    base_model: str | None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    embedder: str | None = None  # sentence-embedding model path; None = the base model
    general: list[str] = field(default_factory=list)  # GenKnowSub general adapters (arrow)
    path: Path | None = None

    @property
    def tasks(self) -> list[str]:
        return [a.task for a in self.adapters]

    @property
    def spec(self) -> registry.Strategy:
        return registry.get(self.strategy)

    def scores(self, emb: torch.Tensor):
        """(scores (n, E), confidence (n,)) of query embeddings (query routers)."""
        return self.spec.score(self.tensors, emb, self.params)

    def save(self, out: str | Path, overwrite: bool = False, results: dict | None = None) -> Path:
        out = check_output(out, [Path(a.path) for a in self.adapters], overwrite)
        with atomic_dir(out, overwrite) as tmp:
            adapters = []
            for a in self.adapters:
                d = dict(vars(a))
                d["relative_path"] = os.path.relpath(Path(a.path).resolve(), out.resolve())
                adapters.append(d)
            cfg = {"format": FORMAT, "peftmerge_version": __version__, "strategy": self.strategy,
                   "params": self.params, "base_model": self.base_model, "embedder": self.embedder,
                   "general": self.general, "adapters": adapters}
            (tmp / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp / TENSORS),
                      metadata={"format": FORMAT})
            recipe = {"strategy": self.strategy, "params": self.params, "adapters": self.tasks,
                      "embedder": self.embedder or "base model"}
            write_card(tmp, kind="router", base_model=self.base_model, recipe=recipe, results=results,
                       tags=["routing", self.strategy])
        self.path = out
        return out


def _resolve(folder: Path, entry: dict) -> str:
    rel = entry.get("relative_path")
    if rel and (folder / rel).exists():
        return str((folder / rel).resolve())
    return entry["path"]


def load_router(folder: str | Path) -> Router:
    """Open a router folder written by :meth:`Router.save`."""
    folder = Path(folder)
    cfg_path = folder / CONFIG
    if not cfg_path.is_file():
        raise PeftmergeError(f"{folder}: no {CONFIG}; pass a folder written by `peftmerge route build`")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError:
        raise PeftmergeError(f"{cfg_path}: not valid JSON; rebuild the router") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise PeftmergeError(f"{cfg_path}: not a peftmerge router; rebuild it with `peftmerge route build`")
    registry.get(cfg["strategy"])
    tensors = load_file(str(folder / TENSORS)) if (folder / TENSORS).exists() else {}
    fields = {"task", "shape", "labels", "template"}
    adapters = [AdapterInfo(path=_resolve(folder, a), **{k: a.get(k) for k in fields if k in a})
                for a in cfg["adapters"]]
    return Router(cfg["strategy"], cfg["params"], adapters, cfg.get("base_model"), tensors,
                  cfg.get("embedder"), cfg.get("general") or [], folder)
