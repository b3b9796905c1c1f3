"""bench/serve_vllm.py without vLLM: the assets it serves, the requests it sends, the PEFT reference it checks the
engine against (one PeftModel switching adapters = a model per adapter) and its verdicts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from peftmerge.merge.serve import VLLM_RANKS

spec = importlib.util.spec_from_file_location("serve_vllm", Path(__file__).resolve().parents[2] / "bench" /
                                              "serve_vllm.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    work = tmp_path_factory.mktemp("serve-vllm")
    model = bench.make_tiny_model(work / "model", hidden=64, layers=2)
    served = bench.make_adapters(model, work)
    queries = [q for task in bench.TASKS for q in bench.sentences(task, 2, seed=7)]
    names = bench.route(served, model, work, queries)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    return work, model, served, names, [tokenizer(q)["input_ids"] for q in queries]


def test_served_adapters_requests_and_the_serve_command(assets):
    work, model, served, names, prompts = assets
    configs = {n: json.loads((p / "adapter_config.json").read_text()) for n, p in served.items()}
    assert {n: c["r"] for n, c in configs.items()} == {"colors": 16, "numbers": 8}  # ranks 12 and 6, padded
    assert all(c["r"] in VLLM_RANKS and c["rank_pattern"] == {} and c["lora_alpha"] == c["r"] for c in configs.values())
    routed = [json.loads(line)["adapter"] for line in (work / "routed.jsonl").read_text().splitlines()]
    assert names == routed and set(names) <= set(served)
    requests = bench.build_requests(prompts, [*names[:-1], None], 5)
    assert [r["model"] for r in requests] == [*names[:-1], bench.BASE_NAME]
    assert all(r["prompt"] == p and r["max_tokens"] == 5 and r["temperature"] == 0.0 for r, p in zip(requests, prompts))
    loras = bench.lora_requests(requests, served)
    assert loras[-1] is None
    assert all(lr == (n, 1 + list(served).index(n), str(served[n])) for lr, n in zip(loras, names[:-1]))
    command = bench.serve_command(model, served, "float32")
    assert (f"--lora-modules colors={served['colors']} numbers={served['numbers']} --max-lora-rank 16 --max-loras 2"
            in command and "--enable-lora" in command)


def _greedy(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    for _ in range(n):
        with torch.no_grad():
            x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[0, len(ids):].tolist()


def test_the_peft_reference_equals_one_model_per_adapter(assets):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, model, served, _, prompts = assets
    requests = bench.build_requests(prompts[:3], ["numbers", "colors", None], 4)
    tokens, gaps = bench.peft_greedy(model, served, requests)
    assert len(gaps[0]) == 4 and all(g >= 0 for g in gaps[0])
    for r, got in zip(requests, tokens):
        base = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
        one = base if r["model"] == bench.BASE_NAME else PeftModel.from_pretrained(base, str(served[r["model"]]))
        assert got == _greedy(one.eval(), r["prompt"], 4)
    assert tokens[0] != bench.peft_greedy(model, served, [{**requests[0], "model": "colors"}])[0][0]


def test_compare_tells_exact_near_tie_and_mismatch():
    ref, gaps = [[1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3]], [[0.5, 1e-4, 0.5]] * 3 + [[0.5, 0.5, 0.5]]
    result = bench.compare([[1, 2, 3], [1, 4, 5], [1, 2], [1, 4, 3]], ref, gaps, tie_tol=1e-3)
    assert [q["verdict"] for q in result["queries"]] == ["exact", "near-tie", "mismatch", "mismatch"]
    assert [q["first_difference"] for q in result["queries"]] == [None, 1, 2, 1]
    assert (result["exact"], result["near-tie"], result["mismatch"], result["passed"]) == (1, 1, 2, False)
    assert bench.compare([[1, 2, 3]], ref[:1], gaps[:1], 1e-3)["passed"]
