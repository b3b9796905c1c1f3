"""``evaluate``: score a base model, an adapter, a merged adapter or model (or a router) on task datasets,
next to the baselines people weigh adapters against, in one results table.

Systems in one run:

- the evaluated one: ``adapter`` (single or merged; a merged folder's per-task heads are used one task at a
  time), ``router`` (through ``peftmerge.routing``), or the base model itself;
- ``base``: the base model zero-shot (``zero_shot=True``), ``base+icl<k>``: with ``k`` demonstrations from the
  task's train split (``icl_shots=k``); both score label words with a causal LM;
- ``individual``: each task's own adapter (``reference={task: folder}``); then normalized = evaluated /
  individual on the primary metric (accuracy, or ROUGE-L for free text), per task and averaged.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.predict import predict_generate, predict_head, predict_label_words
from ..data.tasks import Task, icl_examples, load_task, parse_pairs, read_meta
from ..errors import PeftmergeError
from ..io.heads import head_tasks
from . import metrics as M
from .model import ModelCache, adapter_has_head, base_config, check_adapter, is_classifier

log = logging.getLogger(__name__)


@dataclass
class Settings:
    """How predictions are made (recorded in results.json)."""

    batch_size: int = 16  # rows per forward pass
    max_length: int = 256  # tokens per input (prompts are cut from the left)
    max_new_tokens: int = 64  # generation budget for instruction rows
    limit: int | None = None  # first N rows of each data file (quick runs)
    seed: int = 0  # torch seed and the draw of in-context examples
    progress: bool = True

    def check(self) -> "Settings":
        """One line naming the option for a count that is not a whole number >= 1 (``limit``: or None)."""
        for name in ("batch_size", "max_length", "max_new_tokens", "limit", "seed"):
            v = getattr(self, name)
            if name == "limit" and v is None:
                continue
            low = 0 if name == "seed" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise PeftmergeError(f"--{name.replace('_', '-')} {v!r} must be a whole number >= {low}")
        return self


@dataclass
class System:
    """One row of the results table."""

    name: str
    adapter: str | None = None  # one adapter (single or merged) for every task
    per_task: dict[str, str] = field(default_factory=dict)  # or each task's own adapter
    icl_shots: int = 0
    router: str | None = None


def _routing():
    """The routing package, imported lazily; a clear error in builds without it."""
    try:
        from .. import routing  # noqa: F401
    except ImportError:
        raise PeftmergeError("routing is not available in this build (no peftmerge.routing); "
                             "evaluate an adapter with --adapter instead") from None
    if not hasattr(routing, "predict_for_eval"):
        raise PeftmergeError("this build's peftmerge.routing has no predict_for_eval(router, base, task, ...); "
                             "use `peftmerge route eval` instead")
    return routing


def _is_causal(base: str) -> bool:
    archs = base_config(base).get("architectures")
    return archs is None or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def _merge_report(adapter: str | Path) -> dict:
    """The adapter folder's merge_report.json ({} when there is none)."""
    path = Path(adapter) / "merge_report.json"
    if not path.is_file():
        return {}
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise PeftmergeError(f"{path}: not valid JSON; merge again or remove it") from None
    if not isinstance(report, dict) or not isinstance(report.get("inputs", []), list) or \
            not isinstance(report.get("method"), (str, type(None))):
        raise PeftmergeError(f"{path}: not a merge report (no inputs list / method name); merge again or remove it")
    return report


def _merged_input_metas(adapter: str | Path) -> list[dict]:
    metas = []
    for inp in _merge_report(adapter).get("inputs", []):
        if not isinstance(inp, dict) or not isinstance(inp.get("path", ""), str):
            continue
        meta = read_meta(inp.get("path"))
        metas.append({**meta, "task": meta.get("task") or inp.get("task")})
    return metas


def task_meta(name: str, adapter=None, reference: dict | None = None) -> dict:
    """The ``peftmerge.json`` of an adapter trained on task ``name`` (labels, template), if one is known.

    Data under another name (out-of-domain evaluation) is prompted as the adapter was trained: the one template of the
    adapter (or of every input of a merge), with the data's own labels. Inputs trained with different templates
    leave it ambiguous: refused, naming the fix."""
    candidates = []
    if reference and name in reference:
        candidates.append(read_meta(reference[name]))
    if adapter:
        candidates.append(read_meta(adapter))
        candidates += _merged_input_metas(adapter)
    for meta in candidates:
        if meta.get("task") == name and (meta.get("labels") or meta.get("template")):
            return meta
    templates = {m["template"]: m.get("task") or "?" for m in candidates if m.get("template")}
    if len(templates) > 1:
        raise PeftmergeError(f"--data {name}: {adapter} holds adapters trained with different prompt templates (tasks "
                             f"{', '.join(sorted(set(templates.values())))}) and none is named {name}; name the data "
                             "after the task whose prompt it should get (--data TASK=FILE)")
    if templates:
        template, trained = next(iter(templates.items()))
        log.info("task %s: prompted with the template of task %s (the adapter's)", name, trained)
        return {"template": template}
    return {}


def _plan(system: System, task: Task, base: str) -> tuple[str, str | None, str | None]:
    """(mode, adapter, head task) of ``system`` on ``task``; mode: head | label_words | generate."""
    adapter = system.per_task.get(task.name) if system.per_task else system.adapter
    if system.per_task and adapter is None:
        raise PeftmergeError(f"no reference adapter for task {task.name}; give --reference {task.name}=DIR")
    if task.kind == "generate":
        return "generate", adapter, None
    if adapter is not None:
        heads = head_tasks(adapter)
        if heads:
            if task.name not in heads:
                raise PeftmergeError(f"{adapter}: has heads for {', '.join(heads)} but not for task {task.name}; "
                                     "name the --data tasks as the merged adapters' tasks")
            return "head", adapter, task.name
        if adapter_has_head(adapter):
            trained = read_meta(adapter).get("task")
            if trained and trained != task.name:
                raise PeftmergeError(f"{adapter}: its head was trained for task {trained}, not {task.name}; "
                                     "evaluate a classification adapter on its own task")
            return "head", adapter, None
        return "label_words", adapter, None
    if is_classifier(base):
        return "head", None, None
    return "label_words", None, None


def run_system(system: System, tasks: list[Task], base: str, cache: ModelCache, s: Settings,
               train: dict[str, Task] | None = None) -> dict[str, dict[str, float]]:
    """{task: metrics} of one system."""
    results = {}
    for task in tasks:
        torch.manual_seed(s.seed)
        kw = dict(batch_size=s.batch_size, max_length=s.max_length, progress=s.progress)
        demos = []
        if system.icl_shots:
            if not train or task.name not in train:
                raise PeftmergeError(f"--icl-shots needs the train split of task {task.name}; "
                                     f"give --train {task.name}=FILE")
            demos = icl_examples(train[task.name], system.icl_shots, s.seed)
        if system.router:
            preds = _routing().predict_for_eval(system.router, base, task, **kw)
        else:
            mode, adapter, head = _plan(system, task, base)
            if mode in ("label_words", "generate") and not _is_causal(base):
                raise PeftmergeError(f"{base}: not a causal LM, so task {task.name} cannot be scored by "
                                     f"{'label words' if mode == 'label_words' else 'generation'} for system "
                                     f"{system.name}; use adapters with classification heads, or a causal LM")
            if mode == "head":
                model = cache.get("seqcls", adapter, len(task.labels), head)
                preds = predict_head(model, cache.tokenizer, task, **kw)
            elif mode == "label_words":
                preds = predict_label_words(cache.get("causal", adapter), cache.tokenizer, task, demos, **kw)
            else:
                preds = predict_generate(cache.get("causal", adapter), cache.tokenizer, task, demos,
                                         max_new_tokens=s.max_new_tokens, **kw)
        refs = task.references()
        results[task.name] = (M.classification_metrics(preds, refs, task.labels) if task.kind == "classify"
                              else M.generation_metrics(preds, refs))
        log.info("%s on %s: %s", system.name, task.name, results[task.name])
    cache.clear()
    return results


def average(per_task: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the tasks that have it, plus the mean primary metric ("score")."""
    out: dict[str, float] = {}
    for metric in sorted({m for r in per_task.values() for m in r}):
        vals = [r[metric] for r in per_task.values() if metric in r]
        out[metric] = sum(vals) / len(vals)
    if per_task:
        out["score"] = sum(M.primary(r) for r in per_task.values()) / len(per_task)
    return out


def _individual_from(path: str | Path, tasks: list[str]) -> dict:
    from .report import load_results

    try:
        row = load_results([path])[0]["baselines"]["individual"]["tasks"]
    except (KeyError, TypeError):
        raise PeftmergeError(f"{path}: no 'individual' results in it; pass a results.json written by "
                             "`peftmerge eval --reference ...`") from None
    missing = [t for t in tasks if t not in row]
    if missing:
        raise PeftmergeError(f"{path}: has no individual result for task(s) {', '.join(missing)}")
    return {t: row[t] for t in tasks}


def _describe(adapter) -> tuple[str, str | None, int]:
    """(default name, merge method, number of merged tasks) of the evaluated adapter."""
    if adapter is None:
        return "base", None, 0
    meta = read_meta(adapter)
    method = _merge_report(adapter).get("method")
    n = len(meta.get("tasks") or []) or 1
    return (method or Path(adapter).name), method, n


def evaluate(model: str, data, *, adapter=None, router=None, name: str | None = None, reference=None, train=None,
             icl_shots: int = 0, zero_shot: bool = False, reference_results: str | Path | None = None,
             settings: Settings | None = None,
             out: str | Path | None = None, overwrite: bool = False) -> dict:
    """Evaluate and return the results (written to ``out`` as results.json + .md + .png when given).

    ``data``, ``reference`` and ``train`` map task names to paths (dicts, or ``NAME=PATH`` strings).
    ``reference_results``: a results.json whose "individual" row is reused instead of evaluating ``reference``.
    """
    if not model:
        raise PeftmergeError("--model is required: the base model folder, .gguf file or Hub id")
    s = (settings or Settings()).check()
    if adapter and router:
        raise PeftmergeError("give --adapter or --router, not both")
    if isinstance(icl_shots, bool) or not isinstance(icl_shots, int) or icl_shots < 0:
        raise PeftmergeError(f"--icl-shots {icl_shots!r} must be a whole number >= 0")
    data = data if isinstance(data, dict) else parse_pairs(data, "--data")
    reference = reference if isinstance(reference, dict) else parse_pairs(reference, "--reference")
    train = train if isinstance(train, dict) else parse_pairs(train, "--train")
    if not data:
        raise PeftmergeError("no --data; give one or more NAME=FILE (e.g. --data sst2=data/sst2/test.jsonl)")
    for opt, mapping in (("--reference", reference), ("--train", train)):
        extra = sorted(set(mapping) - set(data))
        if extra:
            raise PeftmergeError(f"{opt} names task(s) {', '.join(extra)} that have no --data; "
                                 f"tasks are: {', '.join(data)}")
    for p in [adapter, router, *reference.values()]:
        if p is not None and not Path(p).exists():
            raise PeftmergeError(f"{p}: no such adapter folder; check the path")
    for p in [adapter, *reference.values()]:
        if p is not None:
            check_adapter(p)
    if router is not None:
        _routing().load_router(router)  # a damaged router.json fails now, not after the other systems ran
    if out is not None:
        from .report import check_results_output

        check_results_output(out, [model, adapter, router, reference_results, *data.values(), *reference.values(),
                                   *train.values()], overwrite)

    metas = {t: task_meta(t, adapter, reference) for t in data}
    tasks = [load_task(t, p, limit=s.limit, meta=metas[t]) for t, p in data.items()]
    train_tasks = {t: load_task(t, p, meta=metas[t]) for t, p in train.items()} if icl_shots else {}
    default_name, method, n_tasks = _describe(adapter)
    main = System(name or ("router" if router else default_name), adapter=adapter, router=router)
    systems = [main]
    if zero_shot and (adapter or router):
        systems.append(System("base"))
    if icl_shots:
        systems.append(System(f"base+icl{icl_shots}", icl_shots=icl_shots))
    if reference and reference_results is not None:
        raise PeftmergeError("give --reference or --reference-results, not both")
    if reference:
        systems.append(System("individual", per_task={t: str(p) for t, p in reference.items()}))

    reused = _individual_from(reference_results, [t.name for t in tasks]) if reference_results is not None else None
    cache = ModelCache(model)
    table = {sys.name: run_system(sys, tasks, model, cache, s, train_tasks) for sys in systems}
    if reused is not None:
        table["individual"] = reused
    results = {
        "name": main.name, "model": str(model), "adapter": str(adapter) if adapter else None,
        "router": str(router) if router else None, "method": method, "n_tasks": n_tasks,
        "tasks": table[main.name], "average": average(table[main.name]),
        "baselines": {k: {"tasks": v, "average": average(v)} for k, v in table.items() if k != main.name},
        "data": {t.name: {"path": str(t.path), "rows": len(t.rows), "kind": t.kind,
                          **({"majority": M.majority_rate(t.references())} if t.kind == "classify" else {})}
                 for t in tasks},
        "settings": {"batch_size": s.batch_size, "max_length": s.max_length, "max_new_tokens": s.max_new_tokens,
                     "limit": s.limit, "seed": s.seed, "icl_shots": icl_shots},
    }
    if "individual" in table:
        ind = table["individual"]
        norms = {}
        for t, r in results["tasks"].items():
            denom = M.primary(ind[t])
            norms[t] = M.primary(r) / denom if denom > 0 else float("nan")
            r["normalized"] = norms[t]
        results["average"]["normalized"] = sum(norms.values()) / len(norms)
    if out is not None:
        from .report import write_results

        write_results(results, out, overwrite=overwrite)
    return results
