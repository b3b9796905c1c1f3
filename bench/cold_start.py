"""Cold vs warm ``combine``: what a merge costs in a fresh process (imports included) against the same merge again in
that process.

Two seeded random LoRA adapters (r=8) on a small Llama's shapes (hidden 512, 4 layers, q k v o) are written once;
then each run is its own child process: ``cold`` is the wall time from the process start (interpreter and imports
included) to the end of the first ``combine`` call, ``warm`` the same call again, and ``imports`` the part of cold
spent importing ``peftmerge`` and its ``combine``. Also the ``peftmerge combine`` command end to end.

    python bench/cold_start.py                  # ties, 5 runs; the median is reported
    python bench/cold_start.py --method task_arithmetic --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_adapters(work: Path, hidden: int = 512, layers: int = 4, rank: int = 8) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    folders = [work / f"a{i}" for i in range(2)]
    if all((f / "adapter_model.safetensors").exists() for f in folders):
        return folders
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=256)
    for i, folder in enumerate(folders):
        torch.manual_seed(i)
        model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                   target_modules=list(TARGETS)))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        model.save_pretrained(str(folder))
    return folders


def child(method: str, folders: list[str]) -> None:
    """In a fresh process: the time to import, the first (cold) combine and the second (warm) one."""
    start = float(os.environ["BENCH_START"])
    t0 = time.time()
    import peftmerge  # noqa: F401
    from peftmerge.merge.combine import combine

    t1 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        combine(folders, Path(tmp) / "cold", method, progress=False)
        t2 = time.time()
        combine(folders, Path(tmp) / "warm", method, progress=False)
        t3 = time.time()
    print(json.dumps({"interpreter": t0 - start, "imports": t1 - t0, "cold": t2 - start, "warm": t3 - t2,
                      "peft_imported": "peft" in sys.modules}))


def run(argv: list[str], env: dict) -> float:
    start = time.time()
    subprocess.run(argv, check=True, env={**env, "BENCH_START": repr(start)}, stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE)
    return time.time() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="ties")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "peftmerge-bench" / "cold")
    p.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        child(args.method, args.child)
        return
    folders = [str(f) for f in make_adapters(args.workdir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))}
    rows = []
    for _ in range(args.repeat):
        start = time.time()
        out = subprocess.run([sys.executable, __file__, "--method", args.method, "--child", *folders], check=True,
                             env={**env, "BENCH_START": repr(start)}, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    cli = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            cli.append(run([sys.executable, "-m", "peftmerge.cli.main", "combine", *folders, "-o", f"{tmp}/o",
                            "--method", args.method, "--quiet"], env))
    med = {k: statistics.median(r[k] for r in rows) for k in ("interpreter", "imports", "cold", "warm")}
    print(json.dumps({"method": args.method, "runs": args.repeat, **{k: round(v, 3) for k, v in med.items()},
                      "cold_minus_warm": round(med["cold"] - med["warm"], 3),
                      "cli_end_to_end": round(statistics.median(cli), 3),
                      "peft_imported": any(r["peft_imported"] for r in rows), "load_1min": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
