"""Results tables and plots: one run's results.json + .md + .png, and ``peftmerge eval report`` over many.

Table rows are systems (the evaluated merge, baselines, individual adapters), columns the tasks' primary
metric (accuracy, or ROUGE-L for free text), the mean, and the mean normalized accuracy. A classification
cell below the task's majority-class rate (what always answering the most frequent label scores) is flagged
with :data:`BELOW_MAJORITY`: that system is no better than a constant answer there (e.g. a broken merge).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from ..errors import PeftmergeError
from ..io import atomic
from . import metrics as M


BELOW_MAJORITY = "(!)"


def majority_of(results: dict) -> dict[str, float]:
    """{task: majority-class rate of its evaluated rows} of one results.json (classification tasks)."""
    return {t: d["majority"] for t, d in (results.get("data") or {}).items() if d.get("majority") is not None}


def systems_of(results: dict) -> dict[str, dict]:
    """{system name: {"tasks", "average"}} of one results.json, the evaluated system first."""
    out = {results["name"]: {"tasks": results["tasks"], "average": results["average"],
                             "n_tasks": results.get("n_tasks"), "method": results.get("method")}}
    for k, v in results.get("baselines", {}).items():
        out[k] = {**v, "n_tasks": None, "method": None}
    return out


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def markdown(systems: dict[str, dict], majority: dict[str, float] | None = None) -> str:
    """The results table; cells under the task's ``majority``-class rate are flagged."""
    majority = majority or {}
    tasks = list(dict.fromkeys(t for s in systems.values() for t in s["tasks"]))
    head = "| system | " + " | ".join(tasks) + " | mean | normalized |"
    rows = [head, "|---" * (len(tasks) + 3) + "|"]
    flagged = set()
    for name, s in systems.items():
        cells = []
        for t in tasks:
            if t not in s["tasks"]:
                cells.append("-")
                continue
            score, metrics = M.primary(s["tasks"][t]), s["tasks"][t]
            below = t in majority and "accuracy" in metrics and score < majority[t] - 1e-12
            flagged |= {t} if below else set()
            cells.append(_fmt(score) + (f" {BELOW_MAJORITY}" if below else ""))
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt(s['average'].get('score'))} | "
                    f"{_fmt(s['average'].get('normalized'))} |")
    note = ("\nCells: accuracy (classification) or ROUGE-L (free text); normalized = system / individual adapter "
            "on the same task, averaged.\n")
    if flagged:
        rates = ", ".join(f"{t} {majority[t]:.4f}" for t in tasks if t in flagged)
        note += (f"{BELOW_MAJORITY} below the task's majority-class rate ({rates}): always answering the most "
                 "frequent label would score more.\n")
    return "\n".join(rows) + "\n" + note


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bars(systems: dict[str, dict], path: str | Path) -> None:
    """Per-task bars, one colour per system."""
    plt = _plt()
    tasks = list(dict.fromkeys(t for s in systems.values() for t in s["tasks"]))
    width = 0.8 / max(1, len(systems))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks) * max(1, len(systems)) ** 0.5 + 3), 4))
    for i, (name, s) in enumerate(systems.items()):
        ys = [M.primary(s["tasks"][t]) if t in s["tasks"] else 0.0 for t in tasks]
        ax.bar([j + (i - (len(systems) - 1) / 2) * width for j in range(len(tasks))], ys, width, label=name)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("accuracy / ROUGE-L")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.set_title("Per-task score by system")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def series_name(result: dict) -> str:
    """The line a result belongs to: its system name without a `` (k tasks)`` suffix, so ``ties``, ``ties (2
    tasks)`` and ``ties (3 tasks)`` form one line and a searched ``ties+grid`` is a point of its own."""
    return re.sub(r" \(\d+ tasks?\)$", "", result["name"])


def plot_normalized_vs_tasks(results: list[dict], path: str | Path) -> None:
    """Mean normalized accuracy against the number of merged tasks, one line per system."""
    plt = _plt()
    lines: dict[str, list[tuple[int, float]]] = {}
    for r in results:
        norm = r["average"].get("normalized")
        if norm is not None and r.get("n_tasks"):
            lines.setdefault(series_name(r), []).append((r["n_tasks"], norm))
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    colors = plt.get_cmap("tab20").colors
    for k, (name, pts) in enumerate(sorted(lines.items())):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="os^D"[k // 10 % 4], color=colors[k % 20],
                label=name)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(sorted({n for pts in lines.values() for n, _ in pts}))
    ax.set_xlabel("number of merged tasks")
    ax.set_ylabel("normalized accuracy (merged / individual)")
    if lines:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _results_files(out: Path) -> list[Path]:
    """results.json and the table (.md) and bars (.png) written beside it."""
    return [out, out.with_suffix(".md"), out.with_suffix(".png")]


def check_results_output(out: str | Path, inputs, overwrite: bool = False) -> None:
    """Before an eval: ``out`` is a .json file name, and none of the three files touches an input or exists
    without ``overwrite``."""
    out = Path(out)
    if out.suffix != ".json":
        raise PeftmergeError(f"output {out} must be a .json file (e.g. -o results.json)")
    for p in _results_files(out):
        atomic.check_output(p, [Path(i) for i in inputs if i is not None], overwrite, folder=False)


def _write_files(files: dict[Path, callable], overwrite: bool) -> None:
    """Write each file to a temporary name beside it, then rename all: no half outputs."""
    with atomic.atomic_files(list(files), overwrite) as tmps:
        for p, write in files.items():
            write(tmps[p])


def write_results(results: dict, out: str | Path, overwrite: bool = False) -> list[Path]:
    """results.json at ``out``, plus the table (.md) and the per-task bars (.png) beside it."""
    out = Path(out)
    if out.suffix != ".json":
        raise PeftmergeError(f"output {out} must be a .json file (e.g. -o results.json)")
    systems = systems_of(results)
    files = {
        out: lambda p: p.write_text(json.dumps(_finite(results), indent=2, allow_nan=False)),
        out.with_suffix(".md"): lambda p: p.write_text(f"# Results: {results['name']}\n\n"
                                                     + markdown(systems, majority_of(results))),
        out.with_suffix(".png"): lambda p: plot_bars(systems, p),
    }
    _write_files(files, overwrite)
    return list(files)


def _number(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _metrics_ok(m) -> bool:
    """{metric: number}, holding the primary metric (accuracy or rougeL) as a number."""
    primary = m.get("accuracy", m.get("rougeL")) if isinstance(m, dict) else None
    return (isinstance(m, dict) and all(isinstance(k, str) and _number(v) for k, v in m.items())
            and primary is not None and _number(primary))


def _results_error(r) -> str | None:
    """What makes ``r`` not a results.json that a report can use (types of every field it reads), or None."""
    if not isinstance(r, dict) or "tasks" not in r or "name" not in r:
        return "not a peftmerge results.json (no 'name'/'tasks')"
    if not isinstance(r["name"], str):
        return f"'name' {r['name']!r} is not a string"
    for key, row in [("the evaluated system", r), *((f"baseline {k!r}", v) for k, v in
                                                    (r.get("baselines") or {}).items())]:
        if not isinstance(row, dict) or not isinstance(row.get("tasks"), dict) or \
                not all(_metrics_ok(m) for m in row["tasks"].values()):
            return f"the tasks of {key} are not {{task: {{metric: number}}}}"
        if not isinstance(row.get("average", {}), dict) or not all(_number(v) for v in row.get("average", {}).values()):
            return f"the average of {key} is not {{metric: number}}"
    if not isinstance(r.get("baselines", {}), dict):
        return "'baselines' is not a JSON object"
    if r.get("n_tasks") is not None and (not isinstance(r["n_tasks"], int) or isinstance(r["n_tasks"], bool)):
        return f"'n_tasks' {r['n_tasks']!r} is not a whole number"
    return None


def load_results(paths) -> list[dict]:
    out = []
    for p in paths:
        p = Path(p)
        try:
            r = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # ValueError: bad JSON, and bytes that are not UTF-8
            raise PeftmergeError(f"{p}: not a readable results.json; pass files written by `peftmerge eval -o`") \
                from None
        bad = _results_error(r)
        if bad:
            raise PeftmergeError(f"{p}: {bad}; pass files written by `peftmerge eval -o`")
        r.setdefault("average", {})
        out.append(r)
    return out


def _finite(value):
    """``value`` with NaN and infinities as None: JSON has no NaN (an undefined normalized score is null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def report(files, out: str | Path, *, title: str = "Results", overwrite: bool = False) -> dict:
    """Combine several results.json files into ``out``/report.md, bars.png, normalized_vs_tasks.png."""
    if not files:
        raise PeftmergeError("no results files; pass one or more results.json written by `peftmerge eval -o`")
    results = load_results(files)
    systems: dict[str, dict] = {}
    majority: dict[str, float] = {}
    for r in results:
        for name, s in systems_of(r).items():
            systems.setdefault(name, s)  # a baseline shared by several files is shown once
        for t, rate in majority_of(r).items():
            majority.setdefault(t, rate)
    out = atomic.check_output(out, [Path(f) for f in files], overwrite)
    md = [f"# {title}", "", markdown(systems, majority), "![per-task scores](bars.png)", ""]
    if any(r["average"].get("normalized") is not None for r in results):
        md += ["![normalized accuracy vs number of merged tasks](normalized_vs_tasks.png)", ""]
    with atomic.atomic_dir(out, overwrite=overwrite) as tmp:
        plot_bars(systems, tmp / "bars.png")
        plot_normalized_vs_tasks(results, tmp / "normalized_vs_tasks.png")
        (tmp / "report.md").write_text("\n".join(md))
        (tmp / "report.json").write_text(json.dumps(_finite({"systems": systems, "files": [str(f) for f in files]}),
                                                    indent=2))
    return {"systems": systems, "out": str(out)}
