"""``search``: tune a merge method's hyperparameters on validation splits, then write the best merge.

Strategies (the objective is the mean over tasks of accuracy, or ROUGE-L for free text):

- ``grid``: every combination of one or two of the method's parameters (those that declare a default grid:
  ``lambda``, ``density``, ``gamma``, ``off_diagonal``...), as the task-arithmetic and TIES papers choose lambda on
  validation data (Ilharco et al. 2023; Yadav et al. 2023);
- ``es``: per-model weights by a seeded evolution strategy (:func:`.optim.evolve`), as LoraHub and PCB-Merging
  search per-model coefficients (optional L1 penalty on the weights, LoraHub's regulariser);
- ``layerwise``: one task-arithmetic coefficient per input and layer (or module), learned with Adam on the
  validation cross-entropy, every task in every step (supervised AdaMerging, :mod:`.layerwise`); the
  validation score after every epoch picks the written coefficients (epoch 0 = the start: lambda everywhere).
  With ``regmean`` the coefficients weigh each input's RegMean share dW_i G_i G^-1 instead of dW_i, starting
  at 1 (RegMean itself).

Candidates are merged in memory and patched into a loaded model (:mod:`.inmemory`); the test split is never
read (a data file named ``test*`` is refused). The best merge is written by :func:`peftmerge.combine` with
``search.json`` (the trace) and ``search_trace.png`` beside it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.predict import predict_generate, predict_head, predict_label_words
from ..data.tasks import load_task, parse_pairs, read_meta, refuse_test_split
from ..errors import PeftmergeError
from ..evaluate import metrics as M
from ..evaluate.model import load_model, load_tokenizer
from ..io import atomic
from ..io.card import write_card
from ..io.heads import load_plain_head
from ..merge import registry
from ..merge.combine import combine, open_grams
from ..merge.plan import open_inputs, plan_modules
from . import layerwise, optim
from .inmemory import InMemoryMerge, Patcher

log = logging.getLogger(__name__)


class Evaluator:
    """Scores merged task vectors on the validation tasks with patched models (one per model kind)."""

    def __init__(self, base, adapters, plans, tasks, *, batch_size, max_length, max_new_tokens):
        self.tasks, self.kw = tasks, dict(batch_size=batch_size, max_length=max_length, progress=False)
        self.max_new_tokens = max_new_tokens
        self.tokenizer = load_tokenizer(base)
        owners = {a.task: a for a in adapters}
        fan = any(a.config.get("fan_in_fan_out") for a in adapters)
        self.plan: dict[str, tuple] = {}  # task -> (model key, head adapter or None)
        self.models: dict[tuple, tuple] = {}
        for t in tasks:
            owner = owners.get(t.name)
            if t.kind == "classify" and owner is not None and owner.head_keys:
                key, head = ("seqcls", len(t.labels)), owner
            else:
                key, head = ("causal", None), None
            if key not in self.models:
                model = load_model(base, key[0], key[1] if key[0] == "seqcls" else None)
                self.models[key] = (model, Patcher(model, plans, fan))
            self.plan[t.name] = (key, head)

    def __call__(self, deltas: dict, only: str | None = None) -> dict[str, float]:
        """{task: primary metric} of the model patched with ``deltas``."""
        for model, patcher in self.models.values():
            patcher.apply(deltas)
        out = {}
        for t in self.tasks:
            if only is not None and t.name != only:
                continue
            key, head = self.plan[t.name]
            model = self.models[key][0]
            if head is not None:
                load_plain_head(model, head)
                preds = predict_head(model, self.tokenizer, t, **self.kw)
            elif t.kind == "classify":
                preds = predict_label_words(model, self.tokenizer, t, **self.kw)
            else:
                preds = predict_generate(model, self.tokenizer, t, max_new_tokens=self.max_new_tokens, **self.kw)
            refs = t.references()
            out[t.name] = M.primary(M.classification_metrics(preds, refs, t.labels) if t.kind == "classify"
                                    else M.generation_metrics(preds, refs))
        return out


def _axes(grid: dict | None, method: registry.Method) -> dict[str, list]:
    """The grid: the given one, else the method's first two parameters that declare default values to try (the
    space every method runs in, ``space=full,core,knots``, only where given)."""
    searchable = {p.name: p for p in method.params if p.grid}
    known = list(searchable) + [registry.SPACE.name]
    if not grid:
        grid = {name: list(searchable[name].grid) for name in list(searchable)[:2]}
    for name, values in grid.items():
        if name not in known:
            raise PeftmergeError(f"--grid {name}: method {method.name} has no searchable parameter {name!r} "
                                 f"(searchable: {', '.join(known) or 'none; use --strategy es'})")
        if not values:
            raise PeftmergeError(f"--grid {name} has no values; give e.g. {name}=0.5,1.0")
    if not grid:
        raise PeftmergeError(f"method {method.name} has no parameter to grid over; use --strategy es "
                             "(per-model weights)")
    if len(grid) > 2:
        raise PeftmergeError(f"--grid over {len(grid)} parameters; grid one or two (use --strategy es for more)")
    for name, values in grid.items():
        if name == registry.SPACE.name:
            for v in values:
                registry.SPACE.check(v)
    return {k: [v if isinstance(v, str) else float(v) for v in vs] for k, vs in grid.items()}


def parse_grid(values: Sequence[str]) -> dict[str, list]:
    """``("lambda=0.5,1", "density=0.1,0.2")`` -> {name: values}; ``space=core,knots`` keeps its names."""
    out = {}
    for v in values or ():
        name, sep, rest = v.partition("=")
        items = [x.strip() for x in rest.split(",") if x.strip()]
        if name.strip() == registry.SPACE.name:
            out[name.strip()] = items
            continue
        try:
            out[name.strip()] = [float(x) for x in items]
        except ValueError:
            sep = ""
        if sep and not all(math.isfinite(x) for x in out[name.strip()]):
            raise PeftmergeError(f"--grid {v!r} holds a value that is not finite; give finite numbers")
        if not sep:
            raise PeftmergeError(f"--grid {v!r} is not NAME=V1,V2,... (e.g. --grid lambda=0.5,0.8,1.0)")
    return out


def search(inputs: Sequence[str | Path], out: str | Path, method: str | None = None, *, data, model: str | None = None,
           strategy: str = "grid", grid: dict | None = None, budget: int = 40, population: int = 8,
           sigma: float = 0.3, l1: float = 0.0, seed: int = 0, weights: Sequence[float] | None = None,
           params: dict | None = None, rank: int | None = None, limit: int | None = 200, batch_size: int = 16,
           max_length: int = 256, max_new_tokens: int = 32, alpha: float | None = None, force: bool = False,
           epochs: int = 4, lr: float = 0.05, by: str = "layer", average: bool = False,
           grams: str | Path | None = None, overwrite: bool = False, progress: bool = True, **shorthand) -> dict:
    """Tune ``method`` on validation ``data`` ({task: file} or NAME=FILE strings) and write the best merge
    (``grams``: the file of :func:`peftmerge.analysis.grams.grams` that regmean reads). ``params``: the method's
    parameters held fixed (by name, or as keywords of their own as in :func:`peftmerge.combine`; ``lambda`` is the
    start of every coefficient with ``strategy="layerwise"``)."""
    m = registry.get(method or "ties")
    data = data if isinstance(data, dict) else parse_pairs(data, "--data")
    if not data:
        raise PeftmergeError("no --data; give validation splits as NAME=FILE (e.g. --data sst2=sst2/validation.jsonl)")
    for path in data.values():
        refuse_test_split(path, "--data")
    if strategy not in ("grid", "es", "layerwise"):
        raise PeftmergeError(f"--strategy {strategy!r} is not one of grid, es, layerwise")
    if strategy == "layerwise":
        if not m.linear and m.components is None:
            raise PeftmergeError(f"--strategy layerwise learns per-input coefficients of a merge that is a weighted "
                                 f"sum of per-input shares; use --method task_arithmetic or regmean (not {m.name})")
        if epochs < 1 or lr <= 0 or by not in ("layer", "module"):
            raise PeftmergeError(f"layerwise needs --epochs >= 1, --lr > 0 and --by layer|module (got {epochs}, "
                                 f"{lr}, {by!r})")
    if limit is not None and limit < 1:
        raise PeftmergeError(f"--limit {limit} must be >= 1")
    if budget < 1 or population < 2:
        raise PeftmergeError("--budget must be >= 1 and --population >= 2")
    for name, v in (("--sigma", sigma), ("--l1", l1), ("--lr", lr)):
        if not math.isfinite(v) or v < 0 or (name == "--sigma" and v == 0):
            raise PeftmergeError(f"{name} {v} must be a finite number {'> 0' if name == '--sigma' else '>= 0'}")
    for name, v in (("--batch-size", batch_size), ("--max-length", max_length), ("--max-new-tokens", max_new_tokens)):
        if v < 1:
            raise PeftmergeError(f"{name} {v} must be >= 1")
    n = len(inputs)
    fixed = registry.given(params, shorthand)
    m.resolve(fixed, n)  # unknown / out-of-range parameters fail before any work
    axes = _axes(grid, m) if strategy == "grid" else {}
    w0 = list(weights) if weights is not None else [1.0] * n
    if len(w0) != n:
        raise PeftmergeError(f"{len(w0)} weights for {n} inputs; give one weight per input")
    out = atomic.check_output(out, [Path(p) for p in (*inputs, *data.values(), grams, model) if p], overwrite)
    gram_file = open_grams(m, grams, inputs)

    adapters = open_inputs(list(inputs), alpha=alpha, force=force)
    plans = plan_modules(adapters, force=force)
    if gram_file is not None:
        gram_file.check(adapters)
    base = model or next((a.base_model for a in adapters if a.base_model), None)
    if not base:
        raise PeftmergeError("the adapters do not name their base model; pass --model BASE")
    metas = {a.task: read_meta(a.path) for a in adapters}
    tasks = [load_task(t, p, limit=limit, meta=metas.get(t)) for t, p in data.items()]
    merger = InMemoryMerge(adapters, plans, m, rank, grams=gram_file)
    ev = Evaluator(base, adapters, plans, tasks, batch_size=batch_size, max_length=max_length,
                   max_new_tokens=max_new_tokens)
    individual = {}
    for i, a in enumerate(adapters):
        if a.task in data:
            individual.update(ev(merger.single(i), only=a.task))

    if strategy == "layerwise":
        start = 1.0 if m.components is not None else fixed.get("lambda", 0.3)  # regmean: itself
        return _layerwise(inputs, out, m, adapters, plans, merger, ev, tasks, individual, base, w0, start, fixed,
                          grams, epochs=epochs, lr=lr, by=by, batch_size=batch_size,
                          max_length=max_length, seed=seed, limit=limit, rank=rank, alpha=alpha, force=force,
                          average=average, overwrite=overwrite, progress=progress)
    trace: list[dict] = []
    total = budget if strategy == "es" else int(np.prod([len(v) for v in axes.values()]))
    bar = tqdm(total=total, desc=f"search ({m.name}, {strategy})", unit="merge", disable=not progress)

    def score(params: dict, w) -> float:
        t0 = time.perf_counter()
        deltas = merger.merged({**fixed, **params}, w)
        t1 = time.perf_counter()
        per_task = ev(deltas)
        value = sum(per_task.values()) / len(per_task) - l1 * float(np.mean(np.abs(w)))
        row = {"params": {**fixed, **params}, "weights": [round(float(x), 6) for x in w], "score": value,
               "tasks": per_task, "seconds": {"merge": round(t1 - t0, 3),
                                              "evaluate": round(time.perf_counter() - t1, 3)}}
        if individual:
            row["normalized"] = _normalized(per_task, individual)
        trace.append(row)
        bar.update(1)
        bar.set_postfix(best=f"{max(r['score'] for r in trace):.4f}")
        return value

    if strategy == "grid":
        point, best_score, _ = optim.grid(lambda p: score(p, w0), axes)
        best_params, best_w = {**fixed, **point}, w0
    else:
        x, best_score, _ = optim.evolve(lambda x: score({}, x), w0, sigma=sigma, population=population,
                                        budget=budget, seed=seed)
        best_params, best_w = dict(fixed), [float(v) for v in x]
    bar.close()
    best = next(r for r in trace if r["score"] == best_score)
    result = {"method": m.name, "strategy": strategy, "base_model": base, "objective":
              "mean over tasks of accuracy (ROUGE-L for free text)" + (f" - {l1} * mean|w|" if l1 else ""),
              "data": {t.name: {"path": str(t.path), "rows": len(t.rows)} for t in tasks},
              "individual": individual, "best": best, "trace": trace,
              "settings": {"budget": budget, "population": population, "sigma": sigma, "seed": seed, "l1": l1,
                           "limit": limit, "grid": axes, "rank": rank}}

    p = best_params
    return _write(out, inputs, result, dict(weights=best_w, params=p, grams=grams, rank=rank, alpha=alpha,
                                            force=force),
                  f"{m.name} merge of {', '.join(a.task for a in adapters)} (searched)", overwrite)


def _write(out, inputs, result: dict, merge: dict, title: str, overwrite: bool) -> dict:
    """The best merge (``combine(**merge)``), ``search.json``, ``search_trace.png`` and the card, atomically."""
    with atomic.atomic_dir(out, overwrite=overwrite) as tmp:
        report = combine(list(inputs), tmp, result["method"], overwrite=True, progress=False, **merge)
        result["merge"] = {k: report[k] for k in ("method", "params", "weights", "rank")}
        (tmp / "search.json").write_text(json.dumps(result, indent=2))
        plot_trace(result, tmp / "search_trace.png")
        recipe = {**result["merge"], **({"module_weights": "merge_report.json"} if "module_weights" in report
                                        else {}), "search": {k: result[k] for k in ("strategy", "objective", "data")}}
        write_card(tmp, kind="merged-adapter", base_model=result["base_model"], recipe=recipe,
                   results={t: {"validation": v} for t, v in result["best"]["tasks"].items()}, title=title)
    return result


def _normalized(per_task: dict, individual: dict) -> float | None:
    ok = [t for t in individual if individual[t] > 0]
    return sum(per_task[t] / individual[t] for t in ok) / len(ok) if ok else None


def _layerwise(inputs, out, m, adapters, plans, merger, ev, tasks, individual, base, w0, start, fixed, grams, *,
               epochs, lr, by, batch_size, max_length, seed, limit, rank, alpha, force, average, overwrite,
               progress) -> dict:
    """Learn per-layer coefficients (:mod:`.layerwise`); keep the epoch with the best validation score, or with
    ``average`` the mean of the last half of the epochs' coefficients (tail averaging, as SWA: Izmailov et al.,
    UAI 2018), which damps the epoch-to-epoch swing of single Adam iterates."""
    names = [p.name for p in plans]
    group_of = layerwise.groups(names, by)
    order = list(dict.fromkeys(group_of))
    index = {n: order.index(g) for n, g in zip(names, group_of)}
    deltas = {p.name: merger.shares(p, fixed) for p in plans}  # dW_i, or regmean's dW_i G_i G^-1
    for model, _ in ev.models.values():
        model.requires_grad_(False)  # only the coefficients learn
    coef = (torch.tensor(w0, dtype=torch.float32)[:, None] * start).repeat(1, len(order)).requires_grad_(True)
    optimizer = torch.optim.Adam([coef], lr=lr)
    trace: list[dict] = []

    def record(ep, loss: float | None, seconds: float, c: torch.Tensor) -> dict:
        t0 = time.perf_counter()
        per_task = ev(layerwise.merged_deltas(c, deltas, index))
        return {"epoch": ep, "loss": loss, "score": sum(per_task.values()) / len(per_task), "tasks": per_task,
                "normalized": _normalized(per_task, individual),
                "coefficients": [[round(float(x), 6) for x in row] for row in c],
                "seconds": {"train": round(seconds, 3), "evaluate": round(time.perf_counter() - t0, 3)}}

    bar = tqdm(total=epochs + 1, desc=f"search ({m.name}, layerwise by {by})", unit="epoch", disable=not progress)
    trace.append(record(0, None, 0.0, coef.detach().clone()))
    bar.update(1)
    for ep in range(1, epochs + 1):
        t0 = time.perf_counter()
        loss = layerwise.epoch(ev, coef, deltas, index, optimizer, batch_size=batch_size, max_length=max_length,
                               seed=seed + ep)
        trace.append(record(ep, loss, time.perf_counter() - t0, coef.detach().clone()))
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", best=f"{max(r['score'] for r in trace):.4f}")
    bar.close()
    if average:  # the last half: epochs epochs // 2 + 1 .. epochs
        tail = trace[epochs // 2 + 1:]
        mean = torch.tensor([r["coefficients"] for r in tail]).mean(0)
        best = record(f"mean of {tail[0]['epoch']}-{tail[-1]['epoch']}", None, 0.0, mean)
    else:
        best = max(trace, key=lambda r: r["score"])  # the first of equal scores: the earliest epoch
    module_weights = {n: [row[index[n]] for row in best["coefficients"]] for n in names}
    result = {"method": m.name, "strategy": "layerwise", "base_model": base,
              "objective": "mean over tasks of accuracy (ROUGE-L for free text); coefficients learned on the "
                           "validation cross-entropy",
              "data": {t.name: {"path": str(t.path), "rows": len(t.rows)} for t in tasks},
              "individual": individual, "best": best, "trace": trace, "groups": order,
              "inputs": [a.task for a in adapters],
              "settings": {"epochs": epochs, "lr": lr, "by": by, "start": start, "average": average, "seed": seed,
                           "limit": limit, "batch_size": batch_size, "rank": rank, "grid": {}}}
    # the coefficients carry the scale: a linear method's lambda is 1 in the written merge
    written = {**fixed, **({"lambda": 1.0} if registry.LAMBDA in m.params else {})}
    return _write(out, inputs, result, dict(params=written, grams=grams, rank=rank, alpha=alpha, force=force,
                                            module_weights=module_weights),
                  f"layer-wise {m.name} of {', '.join(a.task for a in adapters)} (learned on validation)", overwrite)


def plot_trace(result: dict, path: Path) -> None:
    """Grid: score against the parameter (1-D) or a heatmap (2-D); ES: score per evaluation and best so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trace, axes = result["trace"], result["settings"]["grid"]
    if result["strategy"] == "layerwise":
        return _plot_layerwise(result, path, plt)
    fig, ax = plt.subplots(figsize=(6, 4))
    if result["strategy"] == "grid" and len(axes) == 1:
        (name, values), = axes.items()
        ax.plot(values, [r["score"] for r in trace], marker="o")
        ax.set_xlabel(name)
    elif result["strategy"] == "grid":
        (n1, v1), (n2, v2) = axes.items()
        grid = np.array([r["score"] for r in trace]).reshape(len(v1), len(v2))
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(v2)), [v if isinstance(v, str) else f"{v:g}" for v in v2])
        ax.set_yticks(range(len(v1)), [v if isinstance(v, str) else f"{v:g}" for v in v1])
        ax.set_xlabel(n2)
        ax.set_ylabel(n1)
        fig.colorbar(im)
    else:
        scores = [r["score"] for r in trace]
        ax.scatter(range(len(scores)), scores, s=12, label="candidate")
        ax.plot(np.maximum.accumulate(scores), color="k", label="best so far")
        ax.set_xlabel("evaluation")
        ax.legend()
    ax.set_title(f"{result['method']} search: validation score")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_layerwise(result: dict, path: Path, plt) -> None:
    """Validation score per epoch beside a heatmap of the written coefficients (inputs x groups)."""
    trace = result["trace"]
    coef = np.array(result["best"]["coefficients"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [1, 2]})
    a1.plot([r["epoch"] for r in trace], [r["score"] for r in trace], marker="o")
    if result["settings"].get("average"):
        a1.scatter([trace[-1]["epoch"]], [result["best"]["score"]], marker="*", s=120, color="k", zorder=3,
                   label=f"written: {result['best']['epoch']}")
        a1.legend()
    a1.set_xlabel("epoch")
    a1.set_ylabel("validation score")
    im = a2.imshow(coef, aspect="auto", cmap="coolwarm", vmin=-np.abs(coef).max(), vmax=np.abs(coef).max())
    a2.set_yticks(range(len(result["inputs"])), result["inputs"])
    a2.set_xticks(range(len(result["groups"])), [layerwise.short_name(g) for g in result["groups"]], rotation=90,
                  fontsize=6)
    written = result["best"]["epoch"]
    a2.set_title(f"coefficients ({written if isinstance(written, str) else f'epoch {written}'})")
    fig.colorbar(im, ax=a2)
    fig.suptitle(f"{result['method']} layer-wise search")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
