"""Full-model merge speed and memory: peftmerge vs mergekit-yaml (mergekit 0.1.5), side by side.

Generates (seeded, once, into --workdir) a base and 3 "fine-tuned" models of a ~350M-parameter Llama
config in bfloat16, then for each method runs ``mergekit-yaml`` and ``peftmerge combine --base`` as
child processes, back to back, and reports wall time, peak RSS (``wait4`` rusage of the child), the max
abs difference of the outputs, and the read-bandwidth floor (time to read the input bytes once).

    python bench/full_vs_mergekit.py                       # all four methods, default sizes
    python bench/full_vs_mergekit.py --methods ties --repeat 2

Both tools compute in float32 and write bfloat16 (mergekit: ``dtype: float32, out_dtype: bfloat16``).
Definitions agree for task_arithmetic and for ties at weights 1 (used here); dare_ties (mergekit
rescales to the L1 norm, other masks) and breadcrumbs (mergekit ranks the whole tensor, not rows)
differ by definition, so their difference is shown but not a parity figure.
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
METHODS = ("task_arithmetic", "ties", "dare_ties", "breadcrumbs")
AGREE = {"task_arithmetic", "ties"}


def model_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                       num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                       vocab_size=args.vocab, max_position_embeddings=2048, tie_word_embeddings=False,
                       dtype="bfloat16", architectures=["LlamaForCausalLM"])


def generate(args, work: Path) -> list[Path]:
    """Base + 3 fine-tunes (base + small seeded noise on every tensor), bf16, written once and reused."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    tag = f"l{args.layers}-h{args.hidden}-i{args.intermediate}-v{args.vocab}"
    folders = [work / f"{tag}-base"] + [work / f"{tag}-ft{i}" for i in range(3)]
    if all((f / "model.safetensors").exists() for f in folders):
        return folders
    config = model_config(args)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in LlamaForCausalLM(config).state_dict().items()}
    print(f"generating {sum(torch.Size(s).numel() for s in shapes.values()) / 1e6:.0f}M-parameter models in {work}",
          file=sys.stderr)
    gen = torch.Generator().manual_seed(0)
    base = {n: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for n, s in shapes.items()}
    for i, folder in enumerate(folders):
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(str(folder))
        state = base if i == 0 else {n: (w.float() + torch.randn(w.shape, generator=gen) * 0.002).to(torch.bfloat16)
                                     for n, w in base.items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folders


def run_child(cmd: list[str], log: Path) -> dict:
    """Run ``cmd``; wall seconds and the child's peak RSS (GB) from wait4."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[0]} failed; see {log}")
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_gb": usage.ru_maxrss / 1024**2,
            "load_1min": os.getloadavg()[0]}


def read_floor(folders: list[Path]) -> float:
    """Seconds to read every input byte once (``cat`` to /dev/null)."""
    files = [str(f / "model.safetensors") for f in folders]
    start = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def max_abs_diff(a: Path, b: Path) -> float:
    from safetensors import safe_open

    def index(folder):
        out = {}
        for f in folder.glob("*.safetensors"):
            with safe_open(str(f), "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        return float("nan")
    worst = 0.0
    for name in ia:
        with safe_open(str(ia[name]), "pt") as fa, safe_open(str(ib[name]), "pt") as fb:
            x, y = fa.get_tensor(name).float(), fb.get_tensor(name).float()
        worst = max(worst, float((x - y).abs().max()))
        del x, y
    return worst


def mergekit_cmd(method, folders, out: Path, args) -> list[str]:
    import yaml

    params = {} if method == "task_arithmetic" else {"density": args.density}
    if method == "breadcrumbs":
        params["gamma"] = args.gamma
    config = {"merge_method": method, "base_model": str(folders[0]), "dtype": "float32", "out_dtype": "bfloat16",
              "models": [{"model": str(f), "parameters": {"weight": 1.0, **params}} for f in folders[1:]]}
    path = out.parent / f"{out.name}.yml"
    path.write_text(yaml.safe_dump(config))
    return ["mergekit-yaml", str(path), str(out), "--no-copy-tokenizer", "--lazy-unpickle"]


def peftmerge_cmd(method, folders, out: Path, args) -> list[str]:
    cmd = [sys.executable, "-m", "peftmerge.cli.main", "combine", *map(str, folders[1:]), "--base", str(folders[0]),
           "-o", str(out), "--method", method, "--quiet", "--overwrite"]
    if method != "task_arithmetic":
        cmd += ["--density", str(args.density)]
    if method == "breadcrumbs":
        cmd += ["--gamma", str(args.gamma)]
    return cmd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "peftmerge-bench" / "full")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--gamma", type=float, default=0.01)
    p.add_argument("--repeat", type=int, default=1, help="runs per tool and method; the fastest is reported")
    p.add_argument("--skip-mergekit", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    os.chdir(ROOT)  # `python -m peftmerge` runs this checkout
    args.workdir.mkdir(parents=True, exist_ok=True)
    folders = generate(args, args.workdir)
    in_bytes = sum((f / "model.safetensors").stat().st_size for f in folders)
    floor = min(read_floor(folders) for _ in range(2))
    print(f"inputs: 4 x {in_bytes / 4 / 1e9:.2f} GB; read floor (cat, page cache): {floor:.2f} s")

    results = []
    for method in args.methods.split(","):
        row = {"method": method}
        tools = [("peftmerge", peftmerge_cmd)] + ([] if args.skip_mergekit else [("mergekit", mergekit_cmd)])
        for tool, make in tools:
            out = args.workdir / f"out-{tool}-{method}"
            runs = []
            for _ in range(args.repeat):
                subprocess.run(["rm", "-rf", str(out)], check=True)
                runs.append(run_child(make(method, folders, out, args), args.workdir / f"{tool}-{method}.log"))
            row[tool] = min(runs, key=lambda r: r["seconds"])
            row[tool]["peak_rss_gb"] = max(r["peak_rss_gb"] for r in runs)
        if "mergekit" in row:
            row["speedup"] = row["mergekit"]["seconds"] / row["peftmerge"]["seconds"]
            row["rss_ratio"] = row["peftmerge"]["peak_rss_gb"] / row["mergekit"]["peak_rss_gb"]
            row["max_abs_diff"] = max_abs_diff(args.workdir / f"out-peftmerge-{method}",
                                               args.workdir / f"out-mergekit-{method}")
            row["definitions_agree"] = method in AGREE
        row["x_read_floor"] = row["peftmerge"]["seconds"] / floor
        results.append(row)
        print(json.dumps(row), flush=True)

    print("\n| method | peftmerge s | mergekit s | speed-up | peftmerge peak RSS GB | mergekit peak RSS GB | RSS ratio "
          "| max abs diff | peftmerge / read floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        pm, mk = r["peftmerge"], r.get("mergekit", {})
        diff = r.get("max_abs_diff")
        diff_s = "" if diff is None else (f"{diff:.2e}" if r["definitions_agree"] else f"{diff:.2e} (defs differ)")
        print(f"| {r['method']} | {pm['seconds']:.1f} | {mk.get('seconds', float('nan')):.1f} | "
              f"{r.get('speedup', float('nan')):.1f}x | {pm['peak_rss_gb']:.2f} | {mk.get('peak_rss_gb', float('nan')):.2f} "
              f"| {r.get('rss_ratio', float('nan')):.2f} | {diff_s} | {r['x_read_floor']:.1f}x |")
    if args.json:
        args.json.write_text(json.dumps({"read_floor_s": floor, "input_bytes": in_bytes, "results": results}, indent=2))


if __name__ == "__main__":
    main()
