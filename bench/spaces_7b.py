"""TIES on LoRA inputs at Llama-2-7B shapes: Core Space and KnOTS' space against the full-space LoRA path.

T = 4..8 seeded random LoRA adapters (r=16) on one decoder layer's modules (q k v o 4096 x 4096, gate up
11008 x 4096, down 4096 x 11008), merged by ``combine`` into a LoRA adapter with ``--method ties`` in each space:
``full`` (the engine from the factors, then a rank-sum(r_i) Krylov SVD: the LoRA path before spaces existed),
``core`` and ``knots`` (exact factors of rank <= T r). Wall time of the ``combine`` call (median of ``--repeat``,
numba's kernels loaded before the first timed call), the output rank and the mean relative error each output
reports (full space: its rank-R truncation; core and knots: 0, nothing truncated).

    OMP_NUM_THREADS=1 python bench/spaces_7b.py                       # the figures in docs/benchmarks.md
    python bench/spaces_7b.py --inputs 4,8 --repeat 1                 # quicker
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
SPACES = ("full", "core", "knots")


def make_adapters(work: Path, n: int, rank: int) -> list[Path]:
    """``n`` seeded random adapters on a whole 7B decoder layer (as bench/lora_vs_peft.py draws them)."""
    import torch
    from lora_vs_peft import SHAPES, build_layer
    from peft import LoraConfig, get_peft_model

    modules = list(SHAPES)
    folders = [work / f"r{rank}-layer-a{i}" for i in range(n)]
    for i, folder in enumerate(folders):
        if (folder / "adapter_model.safetensors").exists():
            continue
        model = get_peft_model(build_layer(modules), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=modules,
                                                                 init_lora_weights=False))
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        model.save_pretrained(str(folder))
    return folders


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", default="4,6,8", help="Numbers of adapters T to merge.")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "peftmerge-bench" / "spaces")
    args = p.parse_args()

    import torch

    from peftmerge.merge.combine import combine

    counts = [int(x) for x in args.inputs.split(",")]
    folders = make_adapters(args.workdir, max(counts), args.rank)
    out = args.workdir / "out"
    combine(folders[:2], out, "ties", space="full", overwrite=True, progress=False)  # numba's kernels, loaded once
    print(f"ties, one Llama-2-7B layer (7 modules), r={args.rank}, {torch.get_num_threads()} thread(s), median of "
          f"{args.repeat}\n")
    print("| T | space | seconds | speed-up vs full | output rank | relative error |\n|---|---|---|---|---|---|")
    for t in counts:
        timings = {}
        for space in SPACES:
            runs = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                report = combine(folders[:t], out, "ties", space=space, overwrite=True, progress=False)
                runs.append(time.perf_counter() - start)
            timings[space] = statistics.median(runs)
            print(f"| {t} | {space} | {timings[space]:.2f} | {timings['full'] / timings[space]:.1f}x | "
                  f"{report['rank_out_max']} | {report['relative_error_mean']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
