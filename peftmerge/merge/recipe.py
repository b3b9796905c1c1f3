"""Merge recipes: the arguments of :func:`peftmerge.combine`, from Python or a YAML file.

The YAML accepts the core of mergekit's format::

    merge_method: ties
    base_model: path/or/hub-id          # optional (full-model output)
    models:
      - model: adapters/sst2
        parameters: {weight: 1.0, density: 0.3}
      - model: adapters/agnews
    parameters: {lambda: 1.0, density: 0.2}
    dtype: bfloat16
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PeftmergeError
from ..io.meta import read_yaml

_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "rank", "tokenizer_source"}


@dataclass
class Recipe:
    """Everything that decides a merge (and is recorded in the output's card and report)."""

    inputs: list[str]
    method: str = "ties"
    weights: list[float] | None = None  # one per input; default 1 each
    params: dict = field(default_factory=dict)  # method hyperparameters (lambda, density, ...)
    rank: int | None = None  # output LoRA rank; default: sum of the input ranks
    dtype: str | None = None  # output dtype; default float32 for adapters
    base: str | None = None  # base model: write a full merged model instead of an adapter


def load_recipe(path: str | Path) -> Recipe:
    """Read a mergekit-style YAML recipe."""
    path = Path(path)
    data = read_yaml(path, "a merge recipe (--config)")
    if not isinstance(data, dict):
        raise PeftmergeError(f"{path}: a recipe is a mapping with merge_method and models; see the README")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise PeftmergeError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; "
                             f"valid keys: {', '.join(sorted(_TOP_KEYS))}")
    models = data.get("models") or []
    if not isinstance(models, list) or not models:
        raise PeftmergeError(f"{path}: 'models' must be a non-empty list of {{model: PATH, parameters: {{...}}}}")
    inputs, weights, per_model = [], [], {}
    for i, entry in enumerate(models):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise PeftmergeError(f"{path}: models[{i}] needs a 'model' key with the adapter path")
        inputs.append(str(entry["model"]))
        p = dict(entry.get("parameters") or {})
        weights.append(float(p.pop("weight", 1.0)))
        for key, value in p.items():
            per_model.setdefault(key, [None] * len(models))[i] = value
    params = dict(data.get("parameters") or {})
    for key, values in per_model.items():
        default = params.get(key)
        if any(v is None for v in values) and default is None:
            raise PeftmergeError(f"{path}: '{key}' is set for some models only; set it for all or in 'parameters'")
        params[key] = [default if v is None else v for v in values]
    return Recipe(inputs=inputs, method=str(data.get("merge_method", "ties")), weights=weights, params=params,
                  rank=data.get("rank"), dtype=data.get("dtype"), base=data.get("base_model"))
