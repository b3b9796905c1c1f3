"""Where the time of one sparse LoRA -> LoRA module merge goes: CPU time per stage of
``execute.lora`` (a sparse method: the engine from the factors) on the benchmark's q_proj inputs (3 seeded
random r=16 adapters, 4096 x 4096).

Each stage is timed with ``time.process_time`` (CPU of the whole process, all threads), so the figures
hold on a loaded machine; run single-threaded for per-core costs. Warm: the last of ``--repeat`` runs.

    OMP_NUM_THREADS=1 python bench/lora_stages.py --method ties
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="ties", help="a sparse method: ties, magnitude_prune, dare_ties, ...")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "peftmerge-bench" / "lora")
    args = p.parse_args()

    import torch
    from lora_vs_peft import make_adapters

    from peftmerge.merge import execute, registry
    from peftmerge.merge.engine import blocked, krylov, radix
    from peftmerge.merge.plan import open_inputs, plan_modules

    spent: dict[str, float] = {}

    def timed(module, name, label):
        fn = getattr(module, name)

        def wrapper(*a, **k):
            start = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                spent[label] = spent.get(label, 0.0) + time.process_time() - start
        setattr(module, name, wrapper)

    timed(radix, "bracket", "sample brackets")
    timed(radix, "band_cuts", "top-k thresholds (incl. brackets)")
    timed(blocked, "merge", "merge pass (incl. thresholds, M @ V0, ||M||^2)")
    timed(krylov, "products", "Krylov products with M")
    timed(krylov, "warm_krylov", "Krylov SVD (incl. products)")

    adapters = open_inputs([str(f) for f in make_adapters(args.workdir, ["q_proj"], 16)])
    plan = plan_modules(adapters)[0]
    m = registry.get(args.method)
    params = m.resolve({"density": args.density}, len(adapters))
    for _ in range(args.repeat):
        spent.clear()
        start = time.process_time()
        _, _, err = execute.lora(m, adapters, plan, torch.ones(len(adapters)), params, args.rank,
                                 execute.context(params, plan.name))
        total = time.process_time() - start
    print(f"{args.method}, {plan.shape[0]} x {plan.shape[1]}, rank {args.rank}, {torch.get_num_threads()} thread(s); "
          f"relative error {err:.9f}")
    print("| stage | CPU ms |\n|---|---|")
    for label, seconds in spent.items():
        print(f"| {label} | {seconds * 1000:.0f} |")
    print(f"| total (execute.lora) | {total * 1000:.0f} |")


if __name__ == "__main__":
    main()
