"""Benchmark: one mixed batch through routed adapters, against the base model and PEFT, in the same run.

A SmolLM2-135M-shaped Llama (its LlamaConfig sizes, random weights, float32) and 8 random r=16 LoRA
adapters on ``--targets``: ``qv`` (q_proj, v_proj: PEFT's default target modules for Llama) or ``all``
(q,k,v,o,gate,up,down). One batch of 32 queries x 64 tokens; row b is routed to adapter b % 8
(4 rows each). Each variant runs ``--rounds`` times, interleaved round-robin with the others (so load
from other processes hits all alike); the table gives the median and the ratio to the base median:

- base model alone; PEFT with one adapter for the whole batch; PEFT's ``adapter_names`` mixed batch;
  PEFT's Arrow (``create_arrow_model``, top-3 of 8, per token);
- peftmerge ``select`` (top-1 per row), ``mixture`` top-2 / top-3 and ``fuse`` top-3 (exact per row),
  ``arrow`` top-3 per token;
- the router's decision for the 32 queries (embedding + scoring) as % of the routed select forward.

    python bench/routing.py --rounds 3            # 1 thread, process CPU time, q_proj + v_proj (default)
    python bench/routing.py --rounds 3 --targets all  # adapters on all 7 projections
    python bench/routing.py --rounds 3 --threads 2  # wall-clock time on 2 threads
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGETS = {"qv": ("q_proj", "v_proj"),
           "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}


def smollm2_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                       rope_theta=100000.0, tie_word_embeddings=True, pad_token_id=2, bos_token_id=1,
                       eos_token_id=2)


def write_adapters(model, folder: Path, n: int, r: int, targets: tuple[str, ...]) -> list[Path]:
    """``n`` random LoRA adapters (PEFT format) on every ``targets`` Linear of ``model``."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    shapes = {name: m.weight.shape for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in targets}
    out = []
    for i in range(n):
        state = {}
        for name, (d_out, d_in) in shapes.items():
            state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, d_in, generator=gen) / d_in ** 0.5
            state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(d_out, r, generator=gen) * 0.02
        path = folder / f"task{i}"
        path.mkdir(parents=True)
        save_file(state, str(path / "adapter_model.safetensors"))
        LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), task_type="CAUSAL_LM",
                   base_model_name_or_path="smollm2-135m-shaped").save_pretrained(str(path))
        out.append(path)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", choices=sorted(TARGETS), default="qv",
                    help="qv: q_proj + v_proj (PEFT's default for Llama); all: the 7 projections")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; with 1 the figures are process CPU seconds, robust to other load on "
                         "a shared machine (with more, wall-clock seconds)")
    ap.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    ap.add_argument("--only", default=None, help="Comma-separated substrings: run only the variants that contain "
                    "one (plus the base model and select, the references), e.g. --only decision")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter

    from peft import ArrowConfig, PeftModel, create_arrow_model
    from transformers import LlamaForCausalLM

    from peftmerge.io.adapter import load_adapter
    from peftmerge.routing.apply import RoutedModel
    from peftmerge.routing.arrow import build_arrow
    from peftmerge.routing.centroid import centroid_scores
    from peftmerge.routing.decide import Decision, decide
    from peftmerge.routing.embed import pooled_hidden
    from peftmerge.routing.probe import fit_probe, probe_scores
    from peftmerge.routing.registry import BuildContext

    torch.manual_seed(0)
    base = LlamaForCausalLM(smollm2_config()).eval()
    n, b, t = args.adapters, args.batch, args.tokens
    tmp = tempfile.TemporaryDirectory(prefix="peftmerge-bench-")
    paths = write_adapters(base, Path(tmp.name), n, args.rank, TARGETS[args.targets])
    adapters = [load_adapter(p) for p in paths]
    names = [f"task{i}" for i in range(n)]

    peft_one = PeftModel.from_pretrained(copy.deepcopy(base), str(paths[0])).eval()
    peft_mixed = PeftModel.from_pretrained(copy.deepcopy(base), str(paths[0]), adapter_name=names[0]).eval()
    for name, p in zip(names[1:], paths[1:]):
        peft_mixed.load_adapter(str(p), adapter_name=name)
    peft_arrow = create_arrow_model(copy.deepcopy(base), [str(p) for p in paths],
                                    ArrowConfig(top_k=3, router_temperature=1.0, rng_seed=0)).eval()
    arrow = build_arrow(BuildContext(adapters, names), {"top_k": 3, "temperature": 1.0})
    routed = RoutedModel(copy.deepcopy(base), adapters, arrow=arrow)

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 49152, (b, t), generator=gen)
    mask = torch.ones_like(ids)
    row_adapter = torch.arange(b) % n
    row_names = [names[int(e)] for e in row_adapter]

    def topk_decision(k):
        idx = torch.stack([(row_adapter + j) % n for j in range(k)], dim=1)
        w = torch.softmax(torch.randn(b, k, generator=gen), dim=1).sort(dim=1, descending=True).values
        return Decision(idx, w, torch.zeros(b, dtype=torch.bool), torch.ones(b))

    select, mix2, mix3 = topk_decision(1), topk_decision(2), topk_decision(3)

    # the router's decision: pooled base hidden state (layer L) -> centroid cosine -> top-1
    centroids = {"centroids": torch.randn(n, 576, generator=gen), "center": torch.zeros(576)}

    def decision_at(layer):
        def run():
            emb = pooled_hidden(base, ids, mask, layer)
            scores, conf = centroid_scores(centroids, emb, {})
            return decide(scores, conf, 1, 0.1)
        return run

    # the default probe: layer 0 (the first layer's input) -> 256-unit MLP -> top-1
    probe = fit_probe(torch.randn(64, 576, generator=gen), torch.arange(64) % n, n,
                      {"hidden": 256, "steps": 5, "lr": 3e-3, "weight_decay": 1e-2, "seed": 0})

    def probe_decision():
        scores, conf = probe_scores(probe, pooled_hidden(base, ids, mask, 0), {})
        return decide(scores, conf, 1, 1.0)

    variants = {
        "base model alone": lambda: base(input_ids=ids, attention_mask=mask, use_cache=False),
        "PEFT, one adapter for the batch": lambda: peft_one(input_ids=ids, attention_mask=mask, use_cache=False),
        "PEFT adapter_names mixed batch": lambda: peft_mixed(input_ids=ids, attention_mask=mask, use_cache=False,
                                                             adapter_names=row_names),
        "PEFT Arrow top-3 of 8": lambda: peft_arrow(input_ids=ids, attention_mask=mask, use_cache=False),
        "peftmerge select (top-1 per row)": lambda: routed(ids, mask, decision=select, mode="select"),
        "peftmerge mixture top-2": lambda: routed(ids, mask, decision=mix2, mode="mixture"),
        "peftmerge mixture top-3": lambda: routed(ids, mask, decision=mix3, mode="mixture"),
        "peftmerge fuse top-3": lambda: routed(ids, mask, decision=mix3, mode="fuse"),
        "peftmerge arrow top-3 of 8 (per token)": lambda: routed(ids, mask, plan=routed.arrow_plan(3, 1.0)),
        "decision: probe on layer 0 (the default)": probe_decision,
        "decision: centroid on base layer 1": decision_at(1),
        "decision: centroid on base layer 2": decision_at(2),
        "decision: centroid on base last layer": decision_at(-1),
    }
    if args.only:
        keep = ("base model alone", "peftmerge select (top-1 per row)")
        variants = {k: v for k, v in variants.items() if k in keep or any(w in k for w in args.only.split(","))}
    with torch.no_grad():
        want = peft_mixed(input_ids=ids, attention_mask=mask, use_cache=False, adapter_names=row_names).logits
        got = routed(ids, mask, decision=select, mode="select").logits
        check = float((want - got).abs().max())
        del want, got
        times: dict[str, list[float]] = {k: [] for k in variants}
        for k, fn in variants.items():  # warm-up
            fn()
        for _ in range(args.rounds):
            for k, fn in variants.items():
                t0 = clock()
                out = fn()
                times[k].append(clock() - t0)
                del out
    med = {k: statistics.median(v) for k, v in times.items()}
    ref, sel = med["base model alone"], med["peftmerge select (top-1 per row)"]
    unit = "process CPU s" if args.threads == 1 else "wall s"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads ({unit}), {args.rounds} rounds; batch {b} x {t} "
          f"tokens, {n} adapters r={args.rank} on {args.targets}; select vs PEFT mixed batch max |logit diff| = {check:.2e}\n")
    print(f"| variant | median ({unit}) | min | x base | % of select forward |")
    print("|---|---|---|---|---|")
    for k in variants:
        pct = f"{100 * med[k] / sel:.1f}%" if k.startswith("decision") else ""
        ratio = "" if k.startswith("decision") else f"{med[k] / ref:.3f}"
        print(f"| {k} | {med[k]:.3f} | {min(times[k]):.3f} | {ratio} | {pct} |")
    if args.json:
        args.json.write_text(json.dumps({"median_s": med, "times_s": times, "logit_check": check}, indent=2))


if __name__ == "__main__":
    main()
