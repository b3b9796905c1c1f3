"""YAML recipes of mergekit's methods: mergekit's parameter settings, resolved tensor by tensor.

A parameter's setting (in a model's ``parameters`` or in the top-level ``parameters``) is, as in mergekit:

- a scalar (numbers may be strings such as ``"1e-5"``, which YAML does not read as numbers);
- a gradient, a list of values over the layers: layer i of L sits at t = i / (L - 1) (t = 1 when L = 1),
  every tensor outside the layers (embeddings, final norm, head) at t = 0; numbers are interpolated
  linearly between the two nearest list entries, booleans take entry int(t (len - 1));
- conditionals, ``{filter: TEXT, value: SETTING}`` or a list of them: the first whose ``filter`` is a
  substring of the tensor's name (no filter, or ``"*"``, matches every tensor) gives the value; when none
  matches, the next scope is asked.

A model's own parameters come first, the top-level ones next, then the method's default; ``weight`` has
none (a model without one is an error, as in mergekit). Per-model parameters (weight, density, gamma,
epsilon) may be set at either level, shared ones (normalize, rescale, lambda, int8_mask, seed) only at the
top. Where mergekit ignores a key silently (an unknown parameter, a shared one set per model) peftmerge
refuses it.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch

from ..errors import PeftmergeError
from . import mergekit_methods as mk
from .execute import module_generator

log = logging.getLogger(__name__)
_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}
_LAYER = re.compile(r"^(.*?)\.(\d+)\.")


def _scalar(v) -> bool:
    return isinstance(v, (bool, int, float, str))


def coerce(value, key: mk.Key, where: str):
    """``value`` as the parameter's type (pydantic's lax rules, as mergekit reads them); NaN/Inf refused."""
    if key.kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise PeftmergeError(f"{where}: {key.name} {value!r} is not true or false")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise PeftmergeError(f"{where}: {key.name} {value!r} is not a number") from None
    if not math.isfinite(f):
        raise PeftmergeError(f"{where}: {key.name} is {value!r}; give a finite number")
    if key.kind is int:
        if f != int(f):
            raise PeftmergeError(f"{where}: {key.name} {value!r} is not a whole number")
        return int(f)
    return f


def check_setting(setting, key: mk.Key, where: str) -> bool:
    """Check a setting's form and every value in it (errors name ``where``); returns whether it holds a
    gradient (a list of values, which depends on the layer)."""
    if isinstance(setting, dict):
        setting = [setting]
    if _scalar(setting):
        coerce(setting, key, where)
        return False
    if not isinstance(setting, list):
        raise PeftmergeError(f"{where}: {key.name} must be a value, a list of values (a gradient) or "
                             f"conditionals {{filter: ..., value: ...}}; got {setting!r}")
    if all(_scalar(v) for v in setting):
        for v in setting:
            coerce(v, key, where)
        if key.name == "seed" and setting:
            raise PeftmergeError(f"{where}: seed takes one value, not a list")
        return bool(setting)
    gradient = False
    for cond in setting:
        if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"value", "filter"}:
            raise PeftmergeError(f"{where}: each conditional of {key.name} is {{filter: TEXT, value: VALUE}} "
                                 f"(filter optional); got {cond!r}")
        value = cond["value"]
        if not (_scalar(value) or (isinstance(value, list) and all(_scalar(v) for v in value))):
            raise PeftmergeError(f"{where}: the value of a {key.name} conditional is a value or a list of values; "
                                 f"got {value!r}")
        gradient |= check_setting(value, key, where)
    return gradient


def evaluate(setting, key: mk.Key, tensor: str, t: float, where: str):
    """The value of ``setting`` for ``tensor`` at layer position ``t``; None when no conditional matches."""
    if isinstance(setting, dict):
        setting = [setting]
    if _scalar(setting):
        return coerce(setting, key, where)
    if not setting:
        return None
    if all(_scalar(v) for v in setting):
        values = [coerce(v, key, where) for v in setting]
        if key.kind is bool:
            return values[int(t * (len(values) - 1))]
        x = t * (len(values) - 1)
        i = int(x)
        j = min(len(values) - 1, i + 1)
        return coerce((1 - (x - i)) * values[i] + (x - i) * values[j], key, where)
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (tensor and str(f) in tensor):
            return evaluate(cond["value"], key, tensor, t, where)
    return None


def layer_positions(names: list[str]) -> dict[str, float]:
    """mergekit's gradient position t of each tensor: i / (L - 1) for layer i of the L layers named
    ``PREFIX.i.`` (L counted per prefix, so a vision tower has its own), 0 elsewhere."""
    found = {n: m for n in names if (m := _LAYER.match(n))}
    count: dict[str, int] = {}
    for m in found.values():
        count[m[1]] = max(count.get(m[1], 0), int(m[2]) + 1)
    out = {}
    for n in names:
        m = found.get(n)
        if m is None:
            out[n] = 0.0
        else:
            layers = count[m[1]]
            out[n] = int(m[2]) / (layers - 1) if layers > 1 else 1.0
    return out


class MergekitRecipe:
    """A YAML recipe of a method mergekit defines, merged with mergekit's definition (:mod:`mergekit_methods`).

    Stands where :func:`peftmerge.combine` takes a registered method (same attributes; :mod:`.execute` computes
    its route ``recipe``); its weights and parameters are resolved per tensor by :meth:`at`."""

    route = "recipe"
    linear = False
    exact_concat = False
    needs_grams = False

    def __init__(self, file: Path, spec: mk.Spec, labels: list[str], per_model: list[dict], shared: dict):
        self.file, self.spec, self.name = file, spec, spec.name
        self.labels, self.per_model, self.shared = labels, per_model, shared
        keys = {k.name: k for k in spec.keys}
        self.keys = keys
        self.gradients = False
        for name, setting in shared.items():
            if name not in keys:
                raise PeftmergeError(f"{file}: {spec.name} takes no parameter {name!r} (its parameters: "
                                     f"{', '.join(keys)}); remove it")
            self.gradients |= check_setting(setting, keys[name], f"{file}: parameters")
        for label, params in zip(labels, per_model):
            for name, setting in params.items():
                key = keys.get(name)
                if key is None:
                    raise PeftmergeError(f"{file}: {label}: {spec.name} takes no parameter {name!r} (its "
                                         f"parameters: {', '.join(keys)}); remove it")
                if not key.per_model:
                    raise PeftmergeError(f"{file}: {label}: {name} applies to the whole merge (mergekit ignores "
                                         "it here); move it to the top-level parameters")
                self.gradients |= check_setting(setting, key, f"{file}: {label}")

    def set_seed(self, seed: int) -> None:
        self.shared["seed"] = seed

    @property
    def seed(self) -> int:
        """The seed of the random choices in an adapter output's refactorization (its random masks take their
        own, per tensor)."""
        return self.shared.get("seed", 0)

    def _value(self, key: mk.Key, i: int | None, tensor: str, t: float):
        scopes = ([(self.per_model[i], self.labels[i])] if i is not None else []) + [(self.shared, "parameters")]
        for scope, label in scopes:
            if key.name in scope:
                value = evaluate(scope[key.name], key, tensor, t, f"{self.file}: {label}")
                if value is not None:
                    return value
        if key.default is mk.REQUIRED:
            raise PeftmergeError(f"{self.file}: {self.labels[i]} has no {key.name} for tensor {tensor} (mergekit "
                                 f"requires one); add {key.name}: 1.0 to its parameters or to the top-level ones")
        return key.default

    def at(self, tensor: str, t: float = 0.0) -> tuple[list[float], dict]:
        """(weights, parameters) of ``tensor`` at layer position ``t``: shared values as scalars, per-model
        ones as lists with one value per input."""
        n = len(self.per_model)
        params = {}
        for key in self.spec.keys:
            if key.per_model:
                params[key.name] = [self._value(key, i, tensor, t) for i in range(n)]
            else:
                params[key.name] = self._value(key, None, tensor, t)
        mk.check(self.spec, params, f"{self.file}: tensor {tensor}")
        return params.pop("weight"), params

    def resolve(self, given: dict, n: int) -> dict:
        """What the merge report records: the shared parameters and each model's settings as written, and the space
        it runs in where ``given`` names one."""
        shared = {k.name: self.shared.get(k.name, k.default) for k in self.spec.keys if not k.per_model}
        space = {"space": given["space"]} if given.get("space") else {}
        return {**shared, "models": [dict(p) for p in self.per_model], "dialect": "mergekit", **space}

    def weights(self) -> list:
        """Each input's ``weight`` setting as written (a number, a gradient or conditionals)."""
        return [p.get("weight", self.shared.get("weight")) for p in self.per_model]

    def merge(self, tensor: str, base: torch.Tensor | None, deltas: torch.Tensor, t: float = 0.0) -> torch.Tensor:
        """mergekit's merge of one tensor from its inputs' (n, *shape) float32 task vectors: the full tensor
        with ``base`` (its base weights), the merged task vector without (adapter outputs)."""
        weights, p = self.at(tensor, t)
        gen = module_generator(p["seed"], tensor)
        if self.spec.name != "linear":
            merged = mk.merge_delta(self.spec, deltas, weights, p, gen, tensor)
            return merged if base is None else merged.add_(base)
        if base is not None:
            return mk.linear_sum(base, deltas, weights, p["normalize"], tensor)
        self._check_base_scale(tensor, weights, p)
        return mk.linear_sum(torch.zeros_like(deltas[0]), deltas, weights, p["normalize"], tensor)

    def _check_base_scale(self, tensor: str, weights: list[float], p: dict) -> None:
        """``linear`` as an adapter: sum_i w_i (theta_0 + dW_i) / D must keep theta_0 (its factor must be 1)."""
        scale = 1.0 if p["normalize"] else sum(weights)
        if self.spec.name == "linear" and abs(scale - 1.0) > 1e-6:
            raise PeftmergeError(f"{self.file}: linear with normalize: false and weights summing to {scale:g} "
                                 f"scales the base model's {tensor} too, which an adapter cannot hold; pass --base "
                                 "to write a full model, or make the weights sum to 1")

    def check_adapters(self, adapters, plans) -> None:
        """What an adapter output cannot do exactly: gradients (no layer count), della on transposed layouts."""
        if self.gradients:
            raise PeftmergeError(f"{self.file}: gradients (lists of values over the layers) need the model's layer "
                                 "count; pass --base BASE to write a full merged model, or use filters")
        for plan in plans:  # every module's settings, before anything is merged
            self._check_base_scale(plan.name, *self.at(f"{plan.name}.weight"))
        if self.spec.sparsify == "della":
            for a in adapters:
                for plan in plans:
                    if plan.kind == "embedding" or a.config.get("fan_in_fan_out"):
                        raise PeftmergeError(f"{a.path}: della ranks the rows of each weight, and {plan.name} is "
                                             "stored transposed in the adapter; pass --base BASE to merge into "
                                             "a full model")


def base_entries(models: list[str], base: str | None, spec: mk.Spec) -> list[bool]:
    """Which ``models`` entries are the base model itself: mergekit merges those as inputs for ``linear``
    only (the task-vector methods leave the base out; its parameters are ignored)."""
    return [base is not None and m == base and spec.name != "linear" for m in models]


def warn_ignored(file: Path, label: str, params: dict) -> None:
    if params:
        log.warning("%s: %s is the base model; its parameters (%s) are not used, as in mergekit", file, label,
                    ", ".join(params))


# Where a YAML recipe (mergekit's conventions) and peftmerge's own flags (the papers') differ:
# (what, `peftmerge combine` flags, a YAML recipe). Rendered into docs/merging.md by :func:`differences_table`.
CONVENTIONS = [
    ('`linear`',
     'an alias of `task_arithmetic`: λ Σ w_i dW_i',
     ('the weighted average of the models, Σ w_i θ_i / Σ w_i (`normalize: false`: the plain sum Σ w_i '
      'θ_i, which an adapter output refuses unless the weights sum to 1); `base_model` is averaged in '
      'too (it needs a weight)')),
    ('`density` default',
     "the paper's: 0.2 (`ties`, `magnitude_prune`), 0.1 (`dare_*`, `breadcrumbs*`, `pcb`)",
     '1.0: nothing is dropped'),
    ('TIES consensus (`ties`, `dare_ties`, `breadcrumbs_ties`, `della`)',
     "signs elected on the unweighted dW_i; the agreeing w_i dW_i divided by their count (PEFT's)",
     ('signs elected on the weighted w_i dW_i; with `normalize` (default on for `ties`, `della`) '
      'divided by the sum of the agreeing weights, without it (default for `dare_ties`, '
      '`breadcrumbs_ties`) summed')),
    ('`normalize` of the other methods',
     '–',
     '`task_arithmetic`, `dare_linear`, `breadcrumbs`, `della_linear` divide by Σ w_i when `normalize: true`'),
    ('DARE rescale',
     "1 / density (the paper's)",
     ('`rescale: true` (default for `dare_*`, `della*`): the kept entries are scaled back to the L1 '
      'norm of the dense dW_i; `rescale: false`: not at all (also accepted by `ties` and '
      '`breadcrumbs*`)')),
    ('`breadcrumbs` masks',
     'per row: drop the top gamma, keep the next density (the official code)',
     'over the whole tensor; with the default density 1, nothing is dropped'),
    ('magnitude trim',
     'exactly int(density n) entries',
     'max(1, int(density n)) entries'),
    ('random masks',
     'seeded by `--seed` and the module name',
     ('seeded by `--seed` (or `seed` in `parameters`, default 0) and the tensor name: the distribution'
      " of mergekit's masks, which come from torch's global generator (the same expected merge, not "
      'the same draw)')),
    ('`weight`',
     '1 unless `--weights` says otherwise',
     'required for every model, as in mergekit'),
    ('per-layer values',
     'one value per input (`--weights`, `--density`)',
     ('gradients (lists interpolated over the layers) and `filter` conditionals for every per-model '
      'parameter; gradients need the layer count, so an adapter output (no `--base`) refuses them')),
    ('compute dtype',
     'float32',
     ('float32, then written in `out_dtype` or `dtype` (mergekit computes in `dtype`: with float16 or '
      'bfloat16 the two differ by rounding)')),
    ('the base model listed under `models`',
     '–',
     'left out of the task-vector methods (its parameters unused, with a warning); averaged in by `linear`'),
    ('`model: BASE+LORA`',
     '–',
     "the LoRA adapter's task vector, when BASE is `base_model`; refused otherwise"),
    ('methods mergekit lacks (`cat`, `magnitude_prune`, `pcb`, `tsv`, `iso_c`, `regmean`)',
     '–',
     "peftmerge's definitions and defaults, one value per parameter, `weight` 1 by default"),
    ('`tokenizer_source`',
     '–',
     ("`base`, `union` or a model, where mergekit's re-mapping of the embeddings is the identity "
      '(every model gives each token the same id and the vocabulary fills the embedding rows): the '
      'output gets that tokenizer and chat template; refused otherwise, and for adapter outputs')),
    ('keys mergekit ignores',
     '–',
     'unknown keys or parameters, a shared parameter set on one model, NaN or Inf values: refused'),
    ('command-line flags with `--config`',
     '–',
     ("the recipe defines the merge: `--method`, `--weights` and the method's parameters are refused; "
      '`--seed`, `--rank`, `--dtype`, `--base` apply')),
]


def differences_table() -> str:
    """docs/merging.md's "Differences from mergekit" table: conventions, then what is refused."""
    rows = ["| | `peftmerge combine` flags (the papers' conventions) | a YAML recipe (`--config`, mergekit's) |",
            "|---|---|---|"]
    rows += [f"| {what} | {flags} | {recipe} |" for what, flags, recipe in CONVENTIONS]
    rows += [f"| `merge_method: {name}` | – | refused ({what}): use `mergekit-yaml` |"
             for name, what in mk.REFUSED_METHODS.items()]
    rows += [f"| `{key}` | – | refused ({what}): {fix} |" for key, (what, fix) in mk.REFUSED_KEYS.items()]
    return "\n".join(rows)
