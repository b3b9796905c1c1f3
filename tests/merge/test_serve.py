"""``--serve-rank``: every module at one rank a serving engine loads.

Checked against: the exact factors (padding adds zero rows/columns only, so dW and PEFT's logits are the
same), the float64 SVD of the merged dW (truncation is the Eckart-Young optimum and reports its error),
vLLM's max-rank sizes, and the adapter_config.json the engines read (uniform r, no patterns, no bias/heads).
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from safetensors.torch import load_file

from conftest import make_adapter, tiny_llama
from peftmerge.cli.main import main
from peftmerge.errors import PeftmergeError
from peftmerge.io.adapter import load_adapter
from peftmerge.merge import serve
from peftmerge.merge.combine import combine
from peftmerge.merge.extract import extract

IDS = torch.tensor([[1, 5, 9, 3, 7, 2]])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two adapters of ranks 4 and 6, the second also on o_proj (so merged ranks differ per module)."""
    d = tmp_path_factory.mktemp("serve")
    return [make_adapter(d / "a", seed=1, r=4, alpha=8),
            make_adapter(d / "b", seed=2, r=6, alpha=4, targets=("q_proj", "v_proj", "o_proj"))]


def _dw(folder) -> dict[str, torch.Tensor]:
    a = load_adapter(folder)
    return {m: a.delta(m) for m in a.modules}


def _optimal(m: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """The best rank-k approximation of m and its relative error, from the float64 SVD."""
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k], float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())


@pytest.mark.parametrize("largest,rank", [(1, 1), (5, 8), (8, 8), (9, 16), (100, 128), (300, 320), (321, 512),
                                          (600, 512)])
def test_vllm_takes_the_smallest_of_its_sizes_that_holds_the_largest_rank(largest, rank):
    assert serve.parse("vllm").target(largest) == rank
    assert serve.parse("VLLM").target(largest) == rank
    assert serve.parse(24).target(largest) == serve.parse("24").target(largest) == 24


@pytest.mark.parametrize("value", [0, "0", "-3", "16.5", "sglang", True])
def test_a_bad_serve_rank_is_refused_in_one_line(value):
    with pytest.raises(PeftmergeError, match=r"--serve-rank .* is not vllm or a whole number >= 1"):
        serve.parse(value)


def test_padding_is_exact_and_truncation_is_the_optimum():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 20, generator=g), torch.randn(12, 6, generator=g)
    a2, b2, err = serve.fit(a, b, 8)
    assert a2.shape == (8, 20) and b2.shape == (12, 8) and err == 0.0
    assert torch.equal(a2[:6], a) and torch.equal(b2[:, :6], b) and not a2[6:].any() and not b2[:, 6:].any()
    a3, b3, err = serve.fit(a, b, 3)
    best, best_err = _optimal(b @ a, 3)
    assert a3.shape == (3, 20) and b3.shape == (12, 3)
    assert err == pytest.approx(best_err, rel=1e-5)
    torch.testing.assert_close((b3 @ a3).double(), best, atol=1e-4, rtol=1e-4)


def test_combine_pads_every_module_to_the_vllm_size_and_changes_no_dw(inputs, tmp_path):
    plain = combine(inputs, tmp_path / "plain", "task_arithmetic", weights=[1.0, -0.5], progress=False)
    report = combine(inputs, tmp_path / "served", "task_arithmetic", weights=[1.0, -0.5], serve_rank="vllm",
                     progress=False)
    assert {r["rank_out"] for r in plain["per_module"]} == {6, 10}  # o_proj: 6, q/v: 4 + 6
    assert report["serve"] == {"requested": "vllm", "rank": 16, "largest_rank_before": 10, "padded": 6,
                               "truncated": 0, "truncation_error_mean": 0.0, "truncation_error_max": 0.0,
                               "vllm_max_lora_rank": 16}
    config = json.loads((tmp_path / "served" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]) == (16, 16, {}, {})
    assert (config["bias"], config["lora_bias"], config["use_dora"], config["modules_to_save"]) == (
        "none", False, False, None)
    plain_t, served_t = (load_file(str(tmp_path / f / "adapter_model.safetensors")) for f in ("plain", "served"))
    for key, t in plain_t.items():  # the same factors, zero rows of A and zero columns of B appended
        s = served_t[key]
        assert s.shape[0 if "lora_A" in key else 1] == 16
        kept = s[:t.shape[0]] if "lora_A" in key else s[:, :t.shape[1]]
        rest = s[t.shape[0]:] if "lora_A" in key else s[:, t.shape[1]:]
        assert torch.equal(kept, t) and not rest.any()
    peft = [PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / f)).eval()(IDS).logits for f in ("plain", "served")]
    torch.testing.assert_close(peft[1], peft[0], atol=1e-6, rtol=1e-6)


def test_combine_truncation_is_the_optimal_rank_r_of_the_merge_and_reports_its_error(inputs, tmp_path):
    report = combine(inputs, tmp_path / "m", "task_arithmetic", serve_rank=3, progress=False)
    exact = {m: sum(d[m] for d in map(_dw, inputs) if m in d) for m in _dw(inputs[1])}
    served = _dw(tmp_path / "m")
    rows = {r["module"]: r for r in report["per_module"]}
    for module, m in exact.items():
        best, best_err = _optimal(m, 3)
        torch.testing.assert_close(served[module].double(), best, atol=1e-4, rtol=1e-4)
        assert rows[module]["serve_error"] == pytest.approx(best_err, rel=1e-4)
        assert rows[module]["rank_out"] == 3 and rows[module]["relative_error"] < 1e-6  # the merge itself: exact
    errors = [r["serve_error"] for r in rows.values()]
    assert report["serve"]["truncated"] == 6 and report["serve"]["truncation_error_max"] == max(errors)
    assert report["serve"]["vllm_max_lora_rank"] == 8


def test_extract_serve_rank_pads_or_truncates_to_the_optimum(tmp_path):
    base = tiny_llama(0)
    base.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(3)
    q, v = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"
    change = {q: 0.1 * torch.randn(32, 5, generator=g) @ torch.randn(5, 32, generator=g),  # rank 5
              v: 0.1 * torch.randn(16, 2, generator=g) @ torch.randn(2, 32, generator=g)}  # rank 2 (16 x 32)
    ft = tiny_llama(0)
    with torch.no_grad():
        for name, d in change.items():
            ft.get_parameter(name + ".weight").add_(d)
    ft.save_pretrained(tmp_path / "ft")
    r = CliRunner().invoke(main, ["extract", str(tmp_path / "ft"), "--base", str(tmp_path / "base"), "-o",
                                  str(tmp_path / "pad"), "--rank", "8", "--serve-rank", "vllm"], catch_exceptions=False)
    assert r.exit_code == 0 and "serve rank 8: 2 modules padded (exact); vLLM --max-lora-rank 8" in r.output, r.output
    report = json.loads((tmp_path / "pad" / "extract_report.json").read_text())
    assert report["r"] == 8 and {m["rank"] for m in report["per_module"].values()} == {8}
    assert {name: m["rank_extracted"] for name, m in report["per_module"].items()} == {q: 5, v: 2}
    got = _dw(tmp_path / "pad")
    for name, d in change.items():
        torch.testing.assert_close(got[name], d, atol=1e-5, rtol=1e-4)
    report = extract(tmp_path / "ft", tmp_path / "base", tmp_path / "cut", rank=8, serve_rank=3, progress=False)
    best, best_err = _optimal(change[q], 3)
    assert report["serve"]["truncated"] == 1 and report["serve"]["padded"] == 1
    assert report["per_module"][q]["serve_error"] == pytest.approx(best_err, rel=1e-4)
    torch.testing.assert_close(_dw(tmp_path / "cut")[q].double(), best, atol=1e-5, rtol=1e-4)
    config = json.loads((tmp_path / "cut" / "adapter_config.json").read_text())
    assert (config["r"], config["rank_pattern"]) == (3, {})


def test_what_the_engines_cannot_serve_is_refused_in_one_line(inputs, tmp_path):
    from transformers import LlamaForSequenceClassification

    heads = make_adapter(tmp_path / "cls", seed=1, task_type="SEQ_CLS", cls=LlamaForSequenceClassification)
    with pytest.raises(PeftmergeError, match=r"task heads \(classifier, score: modules_to_save\).*drop --serve-rank"):
        combine([heads], tmp_path / "m", "task_arithmetic", serve_rank="vllm", progress=False)
    bias = make_adapter(tmp_path / "bias", seed=1, lora_bias=True)
    with pytest.raises(PeftmergeError, match=r"carries bias updates .* drop --serve-rank"):
        combine([bias], tmp_path / "m", "task_arithmetic", serve_rank="vllm", progress=False)
    with pytest.raises(PeftmergeError, match=r"--serve-rank applies to LoRA adapter outputs; drop --base"):
        combine(inputs, tmp_path / "m", "task_arithmetic", serve_rank=16, base=tmp_path / "nobase", progress=False)
    assert not (tmp_path / "m").exists()


def test_cli_summary_line_and_bad_value(inputs, tmp_path):
    r = CliRunner().invoke(main, ["combine", *map(str, inputs), "-o", str(tmp_path / "m"), "--method",
                                  "task_arithmetic", "--serve-rank", "4"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert ("serve rank 4: 0 modules padded (exact), 6 truncated (truncation error mean" in r.output
            and "vLLM --max-lora-rank 8" in r.output)
    r = CliRunner().invoke(main, ["combine", *map(str, inputs), "-o", str(tmp_path / "n"), "--serve-rank", "big"])
    assert r.exit_code == 2 and "--serve-rank 'big' is not vllm or a whole number >= 1" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "n").exists()
