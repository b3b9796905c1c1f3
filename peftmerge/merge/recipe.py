"""Merge recipes: the arguments of :func:`peftmerge.combine`, from Python or a YAML file.

A YAML recipe is mergekit's format and means what it means to mergekit (``mergekit-yaml``)::

    merge_method: ties
    base_model: path/or/hub-id          # optional for adapter outputs; selects a full merged model
    models:
      - model: adapters/sst2            # a LoRA adapter of base_model, or a full fine-tune of it
        parameters: {weight: 1.0, density: 0.3}
      - model: ft/agnews
        parameters: {weight: [0, 0.5, 1], density: [{filter: mlp, value: 0.5}, {value: 0.2}]}
    parameters: {normalize: true}
    dtype: bfloat16

``parameters: {space: core}`` (or knots) runs the method on the LoRA inputs' Core Space or KnOTS' representation
(:mod:`peftmerge.merge.engine.spaces`), for mergekit's methods too. Methods mergekit defines are merged with its
definitions, defaults, gradients and filters
(:mod:`peftmerge.merge.mergekit_recipe`, :mod:`peftmerge.merge.mergekit_methods`); the methods only
peftmerge has keep peftmerge's definitions and take scalar parameters. What cannot be done exactly is
refused with one line (:data:`mergekit_methods.REFUSED_KEYS`, :data:`mergekit_methods.REFUSED_METHODS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PeftmergeError
from ..io.meta import read_yaml
from . import mergekit_methods as mk
from .mergekit_recipe import MergekitRecipe, base_entries, warn_ignored
from .registry import SPACE

_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "rank"}
@dataclass
class Recipe:
    """Everything that decides a merge (and is recorded in the output's card and report)."""

    inputs: list[str]
    method: str = "ties"
    weights: list | None = None  # one per input; default 1 each
    params: dict = field(default_factory=dict)  # method hyperparameters (lambda, density, ...)
    rank: int | None = None  # output LoRA rank; default: sum of the input ranks
    dtype: str | None = None  # output dtype; default float32 for adapters
    base: str | None = None  # base model: write a full merged model instead of an adapter
    mergekit: MergekitRecipe | None = None  # a YAML recipe of a method mergekit defines: merged its way
    tokenizer_source: str | None = None  # full models: "base", "union" or a model whose tokenizer the output gets
    file: Path | None = None  # the YAML file it came from

    def set_overrides(self, method, weights, params: dict) -> None:
        """Command-line values given with this YAML recipe: only ``seed`` is taken, the rest is refused."""
        flags = (["--method"] if method else []) + (["--weights"] if weights is not None else []) + \
            [f"--{k.replace('_', '-')}" for k, v in params.items() if v is not None and k != "seed"]
        if flags:
            raise PeftmergeError(f"{self.file} defines the merge; {', '.join(flags)} would change it: set "
                                 f"{'it' if len(flags) == 1 else 'them'} in the recipe instead")
        if params.get("seed") is not None:
            if self.mergekit is not None:
                self.mergekit.set_seed(params["seed"])
                self.params = self.mergekit.resolve(self.params, len(self.inputs))
            else:
                self.params["seed"] = params["seed"]

    def check_adapter_output(self, adapters, plans, module_weights=None) -> None:
        """Refuse what an adapter output cannot hold exactly (full-model-only keys, mergekit's gradients)."""
        if self.mergekit is not None and module_weights:
            raise PeftmergeError(f"{self.file} defines the weights of {self.mergekit.name}; give per-module ones in "
                                 "it (weight: [{filter: NAME, value: W}, ...]), not module_weights")
        if self.tokenizer_source is not None:
            raise PeftmergeError(f"{self.file}: tokenizer_source applies to full merged models; set base_model "
                                 "(or pass --base) to write one, or remove it")
        if self.mergekit is not None:
            self.mergekit.check_adapters(adapters, plans)


def _model_ref(value, where: str, base: str | None) -> str:
    """A model entry's path; mergekit's ``MODEL+LORA`` is the LoRA itself when MODEL is the base model."""
    if isinstance(value, dict):
        raise PeftmergeError(f"{where}: give the model as a path or Hub id (user/name@revision), not {value!r}")
    ref = str(value)
    if "+" in ref:
        model, _, lora = ref.partition("+")
        if base is None or model != base:
            raise PeftmergeError(f"{where}: {ref} applies LoRA {lora} to {model}, which is not the base model "
                                 f"({base or 'none given'}); peftmerge merges LoRA task vectors of base_model only")
        return lora
    return ref


def load_recipe(path: str | Path) -> Recipe:
    """Read a YAML recipe (mergekit's format)."""
    path = Path(path)
    data = read_yaml(path, "a merge recipe (--config)")
    if not isinstance(data, dict):
        raise PeftmergeError(f"{path}: a recipe is a mapping with merge_method and models; see docs/merging.md")
    for key, (what, fix) in mk.REFUSED_KEYS.items():
        if key in data:
            raise PeftmergeError(f"{path}: {key} ({what}) is not supported; {fix}")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise PeftmergeError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; "
                             f"valid keys: {', '.join(sorted(_TOP_KEYS))}")
    if "merge_method" not in data:
        raise PeftmergeError(f"{path}: no merge_method; add one (e.g. merge_method: ties)")
    method = str(data["merge_method"])
    if method in mk.REFUSED_METHODS:
        raise PeftmergeError(f"{path}: merge_method {method} ({mk.REFUSED_METHODS[method]}) is not supported; "
                             f"use mergekit-yaml for it, or one of {', '.join(mk.METHODS)}")
    base = data.get("base_model")
    base = None if base is None else _model_ref(base, f"{path}: base_model", None)
    models = data.get("models") or []
    if not isinstance(models, list) or not models:
        raise PeftmergeError(f"{path}: 'models' must be a non-empty list of {{model: PATH, parameters: {{...}}}}")
    inputs, labels, per_model = [], [], []
    for i, entry in enumerate(models):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry or set(entry) - {"model", "parameters"}:
            raise PeftmergeError(f"{path}: models[{i}] is {{model: PATH, parameters: {{...}}}}; got {entry!r}")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise PeftmergeError(f"{path}: models[{i}].parameters must be a mapping of name: value")
        ref = _model_ref(entry["model"], f"{path}: models[{i}]", base)
        if ref in inputs:
            raise PeftmergeError(f"{path}: models[{i}] lists {entry['model']} a second time (mergekit refuses "
                                 "duplicate inputs); give each model once, with its weight")
        inputs.append(ref)
        labels.append(f"models[{i}] ({entry['model']})")
        per_model.append(dict(params))
    shared = data.get("parameters") or {}
    if not isinstance(shared, dict):
        raise PeftmergeError(f"{path}: parameters must be a mapping of name: value")
    source = data.get("tokenizer_source")
    recipe = Recipe(inputs=inputs, method=method, rank=data.get("rank"), base=base, file=path,
                    dtype=data.get("out_dtype") or data.get("dtype"),
                    tokenizer_source=None if source is None else str(source))
    spec = mk.METHODS.get(method)
    if spec is None:
        return _peftmerge_method(recipe, path, labels, per_model, dict(shared))
    if spec.name == "linear" and base is not None and base not in inputs:  # mergekit averages its base model too
        inputs.append(base)
        labels.append(f"base_model ({base})")
        per_model.append({})
    is_base = base_entries(inputs, base, spec)
    for flag, label, params in zip(is_base, labels, per_model):
        if flag:
            warn_ignored(path, label, params)
    keep = [i for i, flag in enumerate(is_base) if not flag]
    if not keep:
        raise PeftmergeError(f"{path}: every model is the base model; list the models to merge into it")
    recipe.inputs = [inputs[i] for i in keep]
    space = shared.pop("space", None)  # where peftmerge runs mergekit's method (LoRA inputs), not a mergekit key
    if space is not None and space not in SPACE.choices:
        raise PeftmergeError(f"{path}: parameters: space {space!r} is not one of {', '.join(SPACE.choices)}")
    recipe.mergekit = MergekitRecipe(path, spec, [labels[i] for i in keep], [per_model[i] for i in keep],
                                     dict(shared))
    recipe.weights = recipe.mergekit.weights()
    recipe.params = recipe.mergekit.resolve({"space": space}, len(keep))
    return recipe


def _peftmerge_method(recipe: Recipe, path: Path, labels: list[str], per_model: list[dict], shared: dict) -> Recipe:
    """A method only peftmerge has: its own definition and defaults, scalar parameters, weight 1 by default."""
    for label, params in [("parameters", shared)] + list(zip(labels, per_model)):
        for key, value in params.items():
            if not isinstance(value, (bool, int, float, str)):
                raise PeftmergeError(f"{path}: {label}: {key} {value!r}: gradients and filters apply to mergekit's "
                                     f"methods ({', '.join(mk.METHODS)}); give {recipe.method} one value")
    weights, per_key = [], {}
    default_weight = shared.pop("weight", 1.0)
    for i, p in enumerate(per_model):
        p = dict(p)
        weight = p.pop("weight", default_weight)
        try:
            weights.append(float(weight))
        except (TypeError, ValueError):
            raise PeftmergeError(f"{path}: {labels[i]}: weight {weight!r} is not a number") from None
        for key, value in p.items():
            per_key.setdefault(key, [None] * len(per_model))[i] = value
    for key, values in per_key.items():
        default = shared.get(key)
        if any(v is None for v in values) and default is None:
            raise PeftmergeError(f"{path}: '{key}' is set for some models only; set it for all or in 'parameters'")
        shared[key] = [default if v is None else v for v in values]
    recipe.weights, recipe.params = weights, shared
    return recipe
