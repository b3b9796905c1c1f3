"""LoRI adapters against LoRA adapters on the same MiniLM tasks: individual and merged accuracy side by side.

    python examples/multitask/lori.py                           # 150 steps per adapter, first 200 test rows
    python examples/multitask/lori.py --steps 60 --limit 100    # quicker
    python examples/multitask/lori.py --doc                     # also write the table into docs/results.md

For each of sst2, agnews, mrpc, sms_spam (the seeded 8000-row train subsets that ``run.py`` trains the example
adapters on) one adapter per variant, with the example adapters' recipe (r 16, alpha 32, query/key/value/dense,
lr 1e-3, batch 32, max length 128, ``peftmerge train``'s defaults otherwise, evaluated on 200 validation rows;
``--batch-size`` and ``--max-length`` change batch and length for all variants alike) and the same number of steps:

- ``lora``: LoRA; ``lora_lr10``: LoRA at 10x the learning rate (1e-2, as ``lori_lr10``);
- ``lori``: LoRI-S, ``peftmerge train --method lori`` (A frozen, B at ``--density``, mask calibrated by a
  dense phase of the same length);
- ``lori_d`` (with ``--variants lora,lori,lori_d``): LoRI-D, density 1;
- ``lori_lr10``: LoRI-S at 10x the learning rate (1e-2, both phases; the official scripts train the sparse phase at
  10x the dense phase's).

Each variant's four adapters are merged with task_arithmetic and ties (both at the papers' defaults and each
method's default space) and evaluated on the first ``--limit`` rows of every test split; normalized = merged
accuracy / the same variant's individual adapter, averaged over tasks. Writes ``<work>/lori.json`` and
``lori.md`` (results are reused where present).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from spaces import DATA, ROOT, TASKS, minilm, write_section

VARIANTS = {"lora": {"method": "lora"}, "lora_lr10": {"method": "lora", "lr": 1e-2}, "lori": {"method": "lori"},
            "lori_d": {"method": "lori", "density": 1.0}, "lori_lr10": {"method": "lori", "lr": 1e-2}}
MERGES = ("task_arithmetic", "ties")
TRAIN_ROWS, SEED = 8000, 0
MARK = "<!-- lori table (examples/multitask/lori.py) -->"


def subset(work: Path, task: str) -> Path:
    """The seeded train subset (as run.py draws it) and the validation rows, with task.json beside them."""
    out = work / "data" / task
    out.mkdir(parents=True, exist_ok=True)
    lines = (DATA / task / "train.jsonl").read_text().splitlines()
    random.Random(SEED).shuffle(lines)
    (out / "train.jsonl").write_text("\n".join(lines[:TRAIN_ROWS]) + "\n")
    shutil.copy(DATA / task / "validation.jsonl", out / "validation.jsonl")
    shutil.copy(DATA / task / "task.json", out / "task.json")
    return out


def train_one(base: str, work: Path, variant: str, task: str, steps: int, density: float, batch_size: int,
              max_length: int) -> Path:
    from peftmerge.train import TrainConfig, train

    out = work / "adapters" / variant / task
    if (out / "adapter_config.json").exists():
        return out
    d = subset(work, task)
    opts = {"density": density, "lr": 1e-3, **VARIANTS[variant]}
    start = time.perf_counter()
    train(TrainConfig(model=base, data=str(d / "train.jsonl"), validation=str(d / "validation.jsonl"), task=task,
                      out=str(out), shape="classify", r=16, alpha=32.0, target_modules="query,key,value,dense",
                      max_steps=steps, batch_size=batch_size, max_length=max_length, eval_before=False,
                      max_eval_samples=200, seed=SEED, **opts), progress=False)
    print(f"trained {variant}/{task} in {time.perf_counter() - start:.0f} s", flush=True)
    return out


def run(work: Path, steps: int, limit: int, density: float, variants: list[str], batch_size: int = 32,
        max_length: int = 128) -> dict:
    import torch

    from peftmerge.evaluate import Settings, evaluate
    from peftmerge.merge.combine import combine

    torch.set_num_threads(1)
    base = minilm()
    work.mkdir(parents=True, exist_ok=True)
    store = work / "lori.json"
    settings = {"steps": steps, "limit": limit, "density": density, "batch_size": batch_size,
                "max_length": max_length}
    results = json.loads(store.read_text()) if store.exists() else {}
    if results.get("settings") != settings:
        results = {"settings": settings, "variants": {}}
    test = {t: DATA / t / "test.jsonl" for t in TASKS}
    for v in variants:
        ins = {t: train_one(base, work, v, t, steps, density, batch_size, max_length) for t in TASKS}
        row = results["variants"].setdefault(v, {})
        for m in MERGES:
            if m in row:
                continue
            out = work / "merged" / v / m
            report = combine(list(ins.values()), out, m, overwrite=True, progress=False)
            first = "individual" not in row
            res = evaluate(base, test, adapter=out, reference=ins if first else None,
                           settings=Settings(limit=limit, progress=False))
            if first:
                row["individual"] = {t: r["accuracy"] for t, r in res["baselines"]["individual"]["tasks"].items()}
                row["b_density"] = sum(json.loads((p / "peftmerge.json").read_text())["metrics"].get("b_density", 1.0)
                                       for p in ins.values()) / len(ins)
            acc = {t: r["accuracy"] for t, r in res["tasks"].items()}
            row[m] = {"accuracy": acc, "space": report["params"]["space"],
                      "normalized": sum(acc[t] / row["individual"][t] for t in TASKS) / len(TASKS)}
            store.write_text(json.dumps(results, indent=1))
            print(f"{v}/{m}: normalized {row[m]['normalized']:.4f}", flush=True)
    (work / "lori.md").write_text(table(results))
    return results


def table(results: dict) -> str:
    """Per variant: individual accuracy per task, then each merge's mean accuracy and normalized accuracy."""
    head = ("| adapters | B density | " + " | ".join(TASKS) + " | individual mean | " +
            " | ".join(f"{m} mean | {m} normalized" for m in MERGES) + " |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for v, row in results["variants"].items():
        ind = row["individual"]
        cells = [f"{ind[t]:.3f}" for t in TASKS] + [f"{sum(ind.values()) / len(ind):.3f}"]
        for m in MERGES:
            acc = row[m]["accuracy"]
            cells += [f"{sum(acc.values()) / len(acc):.3f}", f"{row[m]['normalized']:.3f}"]
        lines.append(f"| {v} | {row['b_density']:.2f} | " + " | ".join(cells) + " |")
    s = results["settings"]
    return "\n".join(lines) + (f"\n\n{s['steps']} training steps per adapter (batch {s['batch_size']}, max length "
                               f"{s['max_length']} tokens), first {s['limit']} test rows per task; mean = accuracy "
                               "averaged over the four tasks; normalized = merged / the same adapters' individual "
                               "accuracy, averaged over tasks.\n")


def write_doc(results: dict, command: str) -> None:
    doc = ROOT / "docs" / "results.md"
    body = (f"{MARK}\n## minilm: LoRI adapters against LoRA adapters\n\nWritten by `{command}` "
            f"(on {os.cpu_count()} CPU cores, one thread per process). Training: "
            "docs/training.md#lori.\n\n" + table(results) + MARK)
    write_section(doc, MARK, body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "lori", help="Work folder (not committed).")
    p.add_argument("--steps", type=int, default=150, help="Optimizer steps per adapter (LoRI: per phase).")
    p.add_argument("--limit", type=int, default=200, help="Test rows per task.")
    p.add_argument("--batch-size", type=int, default=32, help="Training batch size (the example adapters': 32).")
    p.add_argument("--max-length", type=int, default=128, help="Longest training example in tokens.")
    p.add_argument("--density", type=float, default=0.1, help="LoRI-S: fraction of B kept (the paper's 0.1).")
    p.add_argument("--variants", default="lora,lori", help=f"Comma-separated, of {', '.join(VARIANTS)}.")
    p.add_argument("--doc", action="store_true", help="Write the table into docs/results.md.")
    a = p.parse_args()
    results = run(a.work, a.steps, a.limit, a.density, a.variants.split(","), a.batch_size, a.max_length)
    print((a.work / "lori.md").read_text())
    if a.doc:
        import shlex

        write_doc(results, "python examples/multitask/lori.py " + shlex.join(x for x in sys.argv[1:] if x != "--doc"))


if __name__ == "__main__":
    main()
