"""LoRA -> LoRA merge speed: peftmerge vs PEFT ``add_weighted_adapter``, side by side.

Three seeded random LoRA adapters (r=16) on one Llama-2-7B decoder layer's shapes (hidden 4096,
intermediate 11008; q k v o gate up down), merged back to a rank-16 adapter with PEFT's ``svd``,
``ties_svd``, ``dare_ties_svd`` and ``magnitude_prune_svd`` and peftmerge's twins (task_arithmetic /
ties / dare_ties / magnitude_prune with ``--rank 16``). Each run is its own child process: wall time of
the merge call, peak RSS of the process (``wait4``), and the relative Frobenius error (in float64) of the output
dW = B A against the exact merged dense dW of that same run (for DARE each tool's own random masks:
PEFT's dense result is captured from ``peft.utils.merge_utils``, peftmerge reports its own).

PEFT's full SVD takes minutes per layer on 2 cores, so by default both tools merge q_proj and
down_proj only (one module of each shape); per-layer figures are extrapolated by element count
(4 modules of q's size, 3 of down's). ``--modules all`` runs the whole layer (no extrapolation: a
one-module run multiplies the fixed costs of a ``combine`` call by 12, and cannot show modules merged in
parallel). numba's kernels are loaded before the timed call, as the imports are (``kernel_load_seconds``).

    python bench/lora_vs_peft.py
    python bench/lora_vs_peft.py --modules all --repeat 3      # the figures in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
          "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}
TWINS = {"svd": "task_arithmetic", "ties_svd": "ties", "dare_ties_svd": "dare_ties",
         "magnitude_prune_svd": "magnitude_prune"}
LAYER_ELEMENTS = sum(a * b for a, b in SHAPES.values())


def build_layer(modules: list[str]):
    """A decoder layer's Linear modules (uninitialised weights: never touched, so no memory)."""
    import torch
    from torch import nn

    layer = nn.Module()
    layer.self_attn, layer.mlp = nn.Module(), nn.Module()
    for name in modules:
        d_out, d_in = SHAPES[name]
        parent = layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
        setattr(parent, name, torch.nn.utils.skip_init(nn.Linear, d_in, d_out, bias=False))
    model = nn.Module()
    model.layers = nn.ModuleList([layer])
    return model


def make_adapters(work: Path, modules: list[str], rank: int) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model

    tag = f"r{rank}-" + "-".join(modules)
    folders = [work / f"{tag}-a{i}" for i in range(3)]
    if all((f / "adapter_model.safetensors").exists() for f in folders):
        return folders
    for i, folder in enumerate(folders):
        model = get_peft_model(build_layer(modules), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=modules,
                                                                 init_lora_weights=False))
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        model.save_pretrained(str(folder))
    return folders


def _rel(dw, target) -> float:
    # float64: a float32 norm over 16.7M entries is off by ~1e-3 relative, more than the gap being compared
    dw, target = dw.double(), target.double()
    return float((dw - target).norm() / target.norm())


def worker_peft(args, folders: list[Path]) -> dict:
    import torch
    from peft import PeftModel
    from peft.tuners.lora import model as lora_model

    modules = args.modules.split(",")
    model = PeftModel.from_pretrained(build_layer(modules), str(folders[0]), adapter_name="a0")
    for i, f in enumerate(folders[1:], 1):
        model.load_adapter(str(f), adapter_name=f"a{i}")
    captured = []  # PEFT's exact dense merge of each module, in call order
    for fn in ("task_arithmetic", "ties", "dare_ties", "magnitude_prune"):
        real = getattr(lora_model, fn)
        setattr(lora_model, fn, lambda *a, _real=real, **k: captured.append(_real(*a, **k)) or captured[-1])
    start = time.perf_counter()
    model.add_weighted_adapter(["a0", "a1", "a2"], [1.0, 1.0, 1.0], "merged", combination_type=args.method,
                               density=args.density, svd_rank=args.rank)
    seconds = time.perf_counter() - start
    errors = []
    targets = [m for n, m in model.named_modules() if hasattr(m, "lora_A") and "merged" in m.lora_A]
    for target, exact in zip(targets, captured):
        with torch.no_grad():
            dw = target.get_delta_weight("merged")
        errors.append(_rel(dw, exact))
    return {"seconds": seconds, "relative_error": sum(errors) / len(errors), "modules": len(errors)}


def worker_peftmerge(args, folders: list[Path]) -> dict:
    import tempfile

    from peftmerge.merge.combine import combine
    from peftmerge.merge.engine import fused

    start = time.perf_counter()
    fused.warm()  # numba loads its compiled kernels once per process (~0.5 s): outside, like the imports
    warm = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        report = combine(folders, Path(tmp) / "out", TWINS[args.method], rank=args.rank, progress=False,
                         density=None if args.method == "svd" else args.density)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "relative_error": report["relative_error_mean"], "modules": report["modules"],
            "kernel_load_seconds": warm}


def run_child(argv: list[str]) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, *argv], stdout=subprocess.PIPE, cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"worker {argv} failed")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["peak_rss_gb"] = usage.ru_maxrss / 1024**2
    result["load_1min"] = os.getloadavg()[0]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modules", default="q_proj,down_proj", help="comma-separated, or 'all' (the whole layer)")
    p.add_argument("--methods", default=",".join(TWINS))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "peftmerge-bench" / "lora")
    p.add_argument("--skip-peft", action="store_true")
    p.add_argument("--repeat", type=int, default=1,
                   help="peftmerge runs per method (fresh processes, interleaved with nothing); the median is reported")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--worker", choices=["peft", "peftmerge"], help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.modules == "all":
        args.modules = ",".join(SHAPES)
    modules = args.modules.split(",")
    sys.path.insert(0, str(ROOT))
    folders = make_adapters(args.workdir, modules, args.rank)
    if args.worker:
        fn = worker_peft if args.worker == "peft" else worker_peftmerge
        print(json.dumps(fn(args, folders)))
        return

    per_layer = LAYER_ELEMENTS / sum(SHAPES[m][0] * SHAPES[m][1] for m in modules)
    common = ["--modules", args.modules, "--rank", str(args.rank), "--density", str(args.density),
              "--workdir", str(args.workdir)]
    results = []
    for method in args.methods.split(","):
        row = {"method": method, "peftmerge_method": TWINS[method]}
        for tool in ["peftmerge"] + ([] if args.skip_peft else ["peft"]):
            runs = [run_child(["--worker", tool, "--method", method, *common])
                    for _ in range(args.repeat if tool == "peftmerge" else 1)]
            row[tool] = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]  # the median run
            row[tool]["all_seconds"] = [r["seconds"] for r in runs]
            row[tool]["seconds_per_layer"] = row[tool]["seconds"] * per_layer
        if "peft" in row:
            row["speedup"] = row["peft"]["seconds"] / row["peftmerge"]["seconds"]
        results.append(row)
        print(json.dumps(row), flush=True)

    print(f"\nmodules: {args.modules} (x{per_layer:.2f} to a full layer), rank {args.rank}, density {args.density}")
    print("| PEFT method | peftmerge s (per layer) | PEFT s (per layer) | speed-up | peftmerge peak RSS GB "
          "| PEFT peak RSS GB | peftmerge rel. error | PEFT rel. error |")
    print("|---|---|---|---|---|---|---|---|")
    nan = {"seconds_per_layer": float("nan"), "peak_rss_gb": float("nan"), "relative_error": float("nan")}
    for r in results:
        pm, pf = r["peftmerge"], r.get("peft", nan)
        print(f"| {r['method']} | {pm['seconds_per_layer']:.2f} | {pf['seconds_per_layer']:.1f} | "
              f"{r.get('speedup', float('nan')):.0f}x | {pm['peak_rss_gb']:.2f} | {pf['peak_rss_gb']:.2f} | "
              f"{pm['relative_error']:.4f} | {pf['relative_error']:.4f} |")
    if args.json:
        args.json.write_text(json.dumps({"modules": modules, "per_layer_factor": per_layer, "results": results},
                                        indent=2))


if __name__ == "__main__":
    main()
