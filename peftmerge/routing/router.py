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

from ..version import __version__
from ..errors import PeftmergeError
from ..io.atomic import atomic_dir, check_output
from ..io.card import write_card
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
    """Open a router folder written by :meth:`Router.save`; every field of router.json is checked (one-line
    errors naming the field), so a hand-edited or damaged router never gets as far as a query."""
    folder = Path(folder)
    cfg_path = folder / CONFIG
    if not cfg_path.is_file():
        raise PeftmergeError(f"{folder}: no {CONFIG}; pass a folder written by `peftmerge route build`")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PeftmergeError(f"{cfg_path}: not valid JSON; rebuild the router") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise PeftmergeError(f"{cfg_path}: not a peftmerge router; rebuild it with `peftmerge route build`")
    bad = _field_error(cfg)
    if bad:
        raise PeftmergeError(f"{cfg_path}: {bad}; rebuild the router with `peftmerge route build`")
    spec = registry.get(cfg["strategy"])
    try:
        resolved = spec.resolve(cfg["params"])
    except PeftmergeError as e:
        raise PeftmergeError(f"{cfg_path}: {e}; fix the value or rebuild the router") from None
    # missing values take their defaults, except `pairs`: routers built before it embedded pairs jointly
    params = {**{k: v for k, v in resolved.items() if k != "pairs"}, **cfg["params"]}
    tensors = _tensors(folder / TENSORS) if (folder / TENSORS).exists() else {}
    fields = {"task", "shape", "labels", "template"}
    adapters = [AdapterInfo(path=_resolve(folder, a), **{k: a.get(k) for k in fields if k in a})
                for a in cfg["adapters"]]
    return Router(cfg["strategy"], params, adapters, cfg.get("base_model"), tensors,
                  cfg.get("embedder"), cfg.get("general") or [], folder)


def _field_error(cfg: dict) -> str | None:
    """What is wrong with router.json's fields (their types), or None."""
    if not isinstance(cfg.get("strategy"), str):
        return f"'strategy' {cfg.get('strategy')!r} is not a router name"
    if not isinstance(cfg.get("params"), dict):
        return "'params' is not a JSON object"
    for key in ("base_model", "embedder"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            return f"{key!r} {cfg[key]!r} is not a path or Hub id"
    general = cfg.get("general") or []
    if not isinstance(general, list) or not all(isinstance(g, str) for g in general):
        return "'general' is not a list of adapter paths"
    adapters = cfg.get("adapters")
    if not isinstance(adapters, list) or not adapters:
        return "'adapters' is not a non-empty list"
    for i, a in enumerate(adapters):
        if not isinstance(a, dict) or not isinstance(a.get("task"), str) or not isinstance(a.get("path"), str):
            return f"adapter {i} is not an object with a 'task' and a 'path'"
        if a.get("shape", "text2text") not in ("text2text", "classify"):
            return f"adapter {a['task']!r} has shape {a.get('shape')!r} (text2text or classify)"
        labels = a.get("labels")
        if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)):
            return f"adapter {a['task']!r} has labels that are not a list of strings"
        if a.get("template") is not None and not isinstance(a["template"], str):
            return f"adapter {a['task']!r} has a template that is not a string"
        if a.get("relative_path") is not None and not isinstance(a["relative_path"], str):
            return f"adapter {a['task']!r} has a relative_path that is not a string"
    return None


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    """router.safetensors, checked (header, and every value finite)."""
    from ..io.safetensors_file import check_finite, read_header

    read_header(path)
    try:
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001  (safetensors' own error type)
        raise PeftmergeError(f"{path}: cannot be read ({str(e).splitlines()[0][:120]}); rebuild the router") from None
    for name, t in tensors.items():
        check_finite(t, path, name)
    return tensors
