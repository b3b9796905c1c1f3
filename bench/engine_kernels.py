"""The engine's kernels against the torch chains they replace, one thread, on one 4096 x 4096 module of three inputs.

- TIES' trim + election + disjoint mean of one tensor: :func:`fused.merge` over row blocks vs the same chain as
  torch ops (the reference, :mod:`peftmerge.merge.methods.ops`) over the whole tensor;
- the threshold pass (count above a bracket, keep the values inside it) per input: :func:`fused.band` vs torch;
- DARE's random draws per entry: the counter-based stream (:func:`fused.drop`) vs ``torch.rand`` from a seeded
  generator;
- the k-th largest |dW| of a tensor: :func:`selection.kth_largest` vs ``torch.kthvalue``;
- the kernels' first call in a fresh process (numba loading its cache; torch and numba already imported), measured
  in a child process.

    python bench/engine_kernels.py            # the figures in docs/engine.md (the median of --repeat runs)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np
import torch


def best(fn, repeat: int) -> float:
    """The median wall time of ``fn()`` in ms."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--size", type=int, default=4096)
    args = p.parse_args()
    torch.set_num_threads(1)

    from peftmerge.merge.engine import blocked, fused, selection
    from peftmerge.merge.methods import ops
    from peftmerge.merge.registry import Sparse

    load = subprocess.run([sys.executable, "-c", "import time, torch, numba; from peftmerge.merge.methods import ops; "
                           "t = time.perf_counter(); from peftmerge.merge.engine import fused; fused.warm(); "
                           "print(time.perf_counter() - t)"], capture_output=True, text=True, check=True)
    fused.warm()
    n, d = 3, args.size
    deltas = torch.randn(n, d, d, generator=torch.Generator().manual_seed(0))
    w = torch.ones(n)
    src = blocked.Deltas.stacked(deltas)
    params = {"density": 0.2, "lambda": 1.0, "sign": "total"}
    flat = deltas[0].reshape(-1)
    k = int(0.2 * flat.numel())
    mags = flat.abs()
    # a bracket of ~1% of the entries around the k-th largest, as the sample gives
    lo = float(mags.kthvalue(mags.numel() - k - 80_000).values)
    hi = float(mags.kthvalue(mags.numel() - k + 80_000).values)
    buf = np.empty(flat.numel() + 1, np.float32)
    x = flat.clone()

    def torch_band():
        over = torch.gt(mags, hi)
        return int(over.sum()), mags[torch.ge(mags, lo).logical_xor_(over)]

    rows = {
        "ties_engine_ms": best(lambda: blocked.merge(Sparse("magnitude", "ties"), src, w, params, workers=1),
                               args.repeat),
        "ties_reference_ms": best(lambda: ops.consensus(deltas * ops.magnitude_mask(deltas, 0.2), w, "ties"),
                                  args.repeat),
        "threshold_pass_fused_ms_per_input": best(lambda: fused.band(flat.numpy(), np.float32(lo), np.float32(hi),
                                                                     buf), args.repeat),
        "threshold_pass_torch_ms_per_input": best(torch_band, args.repeat),
        "dare_stream_ns_per_entry": best(lambda: fused.drop(x.numpy(), 0.5, ops.stream_key(0, 0), 0), args.repeat)
        * 1e6 / flat.numel(),
        "torch_rand_ns_per_entry": best(lambda: torch.rand(flat.numel(), generator=torch.Generator().manual_seed(0)),
                                        args.repeat) * 1e6 / flat.numel(),
        "kth_largest_ms": best(lambda: selection.kth_largest(mags, k), args.repeat),
        "kthvalue_ms": best(lambda: torch.kthvalue(mags, mags.numel() - k + 1), args.repeat),
        "kernel_first_call_s": float(load.stdout.split()[-1]),
    }
    print(json.dumps({"shape": [n, d, d], "threads": 1, **{k: round(v, 3) for k, v in rows.items()}}, indent=1))


if __name__ == "__main__":
    main()
