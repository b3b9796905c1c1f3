"""``extract``: a full fine-tune's weight changes as a LoRA adapter, optimal per module (Eckart-Young).

Checked against: a known low-rank change (recovered exactly), the float64 SVD of each change (the reported
error is the optimum sqrt(sum of the tail s_i^2) / ||dW||, the factors are the optimal truncation), PEFT
(the adapter loads and reproduces the fine-tune's logits: Linear, Conv1D, embeddings, tied LM heads),
mergekit's extract-lora at equal rank, and ``combine`` (extracted adapters merge like trained ones).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peftmerge  # noqa: E402
from peftmerge.cli.main import main  # noqa: E402
from peftmerge.io.adapter import load_adapter  # noqa: E402
from peftmerge.merge.extract import low_rank  # noqa: E402

Q0, V1, EMB, DOWN = ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.embed_tokens",
                     "model.layers.0.mlp.down_proj")


def _low_rank_change(shape, r, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape[0], r, generator=g) @ torch.randn(r, shape[1], generator=g)


def _decaying_change(shape, seed, decay=1.0):
    """A full-rank change with distinct singular values 0.2 * i^-decay (so the optimal truncation is unique)."""
    g = torch.Generator().manual_seed(seed)
    k = min(shape)
    u = torch.linalg.qr(torch.randn(shape[0], k, generator=g)).Q
    v = torch.linalg.qr(torch.randn(shape[1], k, generator=g)).Q
    return (u * (0.2 * torch.arange(1, k + 1.0) ** -decay)) @ v.T


def _save_finetune(folder, changes: dict, model=None, **kw):
    """The tiny Llama (seed 0) with ``changes`` ({tensor name: delta}) added; saved to ``folder``."""
    model = model if model is not None else tiny_llama(0, **kw)
    sd = model.state_dict()
    with torch.no_grad():
        for name, delta in changes.items():
            sd[name] += delta
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base") / "llama"
    tiny_llama(0).save_pretrained(folder)
    return folder


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def _delta(peft_model, module):
    """The update PEFT applies to ``module`` (in the weight's layout)."""
    layer = peft_model.base_model.model.get_submodule(module)
    return layer.get_delta_weight("default")


def test_known_low_rank_change_is_recovered_exactly(base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    w0 = _weights(base)
    changes = {f"{Q0}.weight": _low_rank_change((32, 32), 2, 1), f"{V1}.weight": _low_rank_change((16, 32), 5, 2),
               f"{EMB}.weight": _low_rank_change((128, 32), 3, 3), "model.norm.weight": torch.full((32,), 0.01)}
    ft = _save_finetune(tmp_path / "ft", changes)
    report = peftmerge.extract(ft, base, tmp_path / "out", rank=8, progress=False)

    per = report["per_module"]
    assert {m: per[m]["rank"] for m in per} == {Q0: 2, V1: 5, EMB: 3}  # the true ranks, not 8
    assert max(m["relative_error"] for m in per.values()) < 1e-6
    assert per[EMB]["kind"] == "embedding" and per[EMB]["shape"] == [32, 128]
    assert list(report["not_lora"]) == ["model.norm.weight"] and DOWN in report["unchanged"]
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == 5 and config["lora_alpha"] == 5  # r = the largest rank, the others in rank_pattern
    assert config["rank_pattern"] == {r"model\.layers\.0\.self_attn\.q_proj": 2, r"model\.embed_tokens": 3}
    assert config["rank_pattern"] == config["alpha_pattern"] and sorted(config["target_modules"]) == sorted(per)
    meta = json.loads((tmp_path / "out" / "peftmerge.json").read_text())
    assert meta["task"] == "ft" and meta["mergeable"] is True
    assert (tmp_path / "out" / "README.md").exists() and (tmp_path / "out" / "extract_report.json").exists()

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "out")
    for module in (Q0, V1, EMB):
        want = _weights(ft)[f"{module}.weight"] - w0[f"{module}.weight"]
        torch.testing.assert_close(_delta(model, module), want, rtol=0, atol=1e-6)


def test_reported_error_is_the_eckart_young_optimum(base, tmp_path):
    changes = {f"{Q0}.weight": _decaying_change((32, 32), 1), f"{DOWN}.weight": _decaying_change((32, 64), 2, 0.5),
               f"{EMB}.weight": _decaying_change((128, 32), 3, 2.0)}
    ft = _save_finetune(tmp_path / "ft", changes)
    by_rank = peftmerge.extract(ft, base, tmp_path / "r3", rank=3, progress=False)["per_module"]
    by_energy = peftmerge.extract(ft, base, tmp_path / "e90", energy=0.9, progress=False)["per_module"]
    adapter = load_adapter(tmp_path / "r3")
    for name, delta in changes.items():
        module = name.removesuffix(".weight")
        dw = delta.double().T if module == EMB else delta.double()  # LoRA's layout for the embedding
        u, s, vh = torch.linalg.svd(dw, full_matrices=False)
        tail = lambda k: float((s[k:].square().sum() / s.square().sum()).sqrt())  # noqa: E731
        assert by_rank[module]["rank"] == 3
        assert by_rank[module]["relative_error"] == pytest.approx(tail(3), abs=1e-6)
        optimal = (u[:, :3] * s[:3]) @ vh[:3]
        torch.testing.assert_close(adapter.delta(module).double(), optimal, rtol=0, atol=2e-6)
        energy_k = int((torch.cumsum(s.square(), 0) / s.square().sum() < 0.9).sum()) + 1
        assert by_energy[module]["rank"] == energy_k and by_energy[module]["relative_error"] <= 0.1 ** 0.5
        assert by_energy[module]["relative_error"] == pytest.approx(tail(energy_k), abs=1e-6)


def test_low_rank_of_wide_and_tall_matrices_is_the_truncated_svd():
    for shape in ((40, 12), (12, 40)):
        m = _decaying_change(shape, 7)
        a, b, err = low_rank(m, rank=4)
        assert a.shape == (4, shape[1]) and b.shape == (shape[0], 4)
        u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
        torch.testing.assert_close((b @ a).double(), (u[:, :4] * s[:4]) @ vh[:4], rtol=0, atol=1e-6)
        torch.testing.assert_close(b.T @ b, a @ a.T, rtol=1e-4, atol=1e-6)  # sqrt(S) on both sides
        assert err == pytest.approx(float((m.double() - (b @ a).double()).norm() / m.double().norm()), abs=1e-6)
    a, b, err = low_rank(torch.zeros(5, 7), rank=3)
    assert a.shape == (0, 7) and b.shape == (5, 0) and err == 0.0


@pytest.mark.parametrize("decay", [1.0, 0.1])
def test_small_ranks_of_large_matrices_take_block_krylov_and_stay_optimal(decay, monkeypatch):
    """Rank 4 of a 400 x 300 change goes through the block Krylov SVD, to the optimum within 1e-6 (a flat
    spectrum, decay 0.1, is the slow case); an exact rank-3 change comes back at rank 3."""
    from peftmerge.merge import extract

    calls, original = [], extract.krylov.randomized_svd
    monkeypatch.setattr(extract.krylov, "randomized_svd", lambda *a, **k: calls.append(1) or original(*a, **k))
    m = _decaying_change((400, 300), 5, decay)
    a, b, err = low_rank(m, rank=4)
    assert calls and a.shape == (4, 300)
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    assert err == pytest.approx(float((s[4:].square().sum() / s.square().sum()).sqrt()), abs=1e-6)
    m3 = _low_rank_change((400, 300), 3, 6)
    a, b, err = low_rank(m3, rank=4)
    assert a.shape == (3, 300) and err < 1e-6


@pytest.mark.filterwarnings("ignore:.*tie_word_embeddings.*", "ignore:fan_in_fan_out is set to True")
def test_conv1d_and_tied_embeddings_reproduce_the_finetune_in_peft(tmp_path):
    """GPT-2: Conv1D weights are (in, out) and the LM head is tied to the token embeddings."""
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    ft_model = GPT2LMHeadModel(cfg)
    changes = {"transformer.h.0.attn.c_attn.weight": _decaying_change((32, 96), 1),
               "transformer.h.1.mlp.c_fc.weight": _decaying_change((32, 128), 2),
               "transformer.wte.weight": _decaying_change((64, 32), 3)}
    _save_finetune(tmp_path / "ft", changes, model=ft_model)
    report = peftmerge.extract(tmp_path / "ft", tmp_path / "base", tmp_path / "out", rank=32, progress=False)

    per = report["per_module"]
    assert per["transformer.h.0.attn.c_attn"]["kind"] == "conv1d" and per["transformer.h.0.attn.c_attn"]["shape"] == [96, 32]
    assert per["lm_head"]["tied_to"] == "transformer.wte" and per["lm_head"]["kind"] == "linear"
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), tmp_path / "out").eval()
    ft = GPT2LMHeadModel.from_pretrained(tmp_path / "ft").eval()
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ft(x).logits, rtol=0, atol=1e-4)


def test_equals_mergekit_extract_lora_at_equal_rank(base, tmp_path):
    from mergekit.scripts.extract_lora import main as mergekit_extract

    changes = {f"{Q0}.weight": _decaying_change((32, 32), 1), f"{DOWN}.weight": _decaying_change((32, 64), 2, 0.5),
               f"{EMB}.weight": _decaying_change((128, 32), 3, 2.0)}
    ft = _save_finetune(tmp_path / "ft", changes)
    r = CliRunner().invoke(mergekit_extract, ["--model", str(ft), "--base-model", str(base), "--out-path",
                                              str(tmp_path / "mk"), "--max-rank", "4", "--embed-lora", "--quiet"])
    assert r.exit_code == 0, r.output
    peftmerge.extract(ft, base, tmp_path / "ours", rank=4, progress=False)
    theirs, ours = load_adapter(tmp_path / "mk"), load_adapter(tmp_path / "ours")
    assert set(ours.modules) == {Q0, DOWN, EMB}  # mergekit also writes zero factors for unchanged modules
    for module in ours.modules:
        torch.testing.assert_close(ours.delta(module), theirs.delta(module), rtol=0, atol=1e-5)


def test_extracted_finetunes_merge_like_adapters(base, tmp_path):
    w0 = _weights(base)
    fts = {}
    for i, task in enumerate(("sent", "topic")):
        changes = {f"{Q0}.weight": _low_rank_change((32, 32), 2, 10 + i), f"{DOWN}.weight": _low_rank_change((32, 64), 3, 20 + i)}
        fts[task] = _save_finetune(tmp_path / task, changes)
        peftmerge.extract(fts[task], base, tmp_path / f"lora-{task}", rank=4, progress=False)
    report = peftmerge.combine([tmp_path / "lora-sent", tmp_path / "lora-topic"], tmp_path / "merged",
                               "task_arithmetic")
    assert report["modules"] == 2
    merged = load_adapter(tmp_path / "merged")
    for module in (Q0, DOWN):
        want = sum(_weights(f)[f"{module}.weight"] - w0[f"{module}.weight"] for f in fts.values())
        torch.testing.assert_close(merged.delta(module), want, rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "merged" / "peftmerge.json").read_text())["tasks"] == ["sent", "topic"]


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_extract_and_one_line_errors(base, tmp_path):
    ft = _save_finetune(tmp_path / "ft", {f"{Q0}.weight": _decaying_change((32, 32), 1),
                                          f"{V1}.weight": _low_rank_change((16, 32), 2, 2)})
    r = _run("extract", ft, "--base", base, "-o", tmp_path / "out", "--energy", "0.99", "--rank", "6",
             "--modules", "q_proj,v_proj", "--quiet")
    assert r.exit_code == 0, r.output
    per = json.loads((tmp_path / "out" / "extract_report.json").read_text())["per_module"]
    assert per[Q0]["rank"] == 6 and per[V1]["rank"] == 2  # energy 0.99 needs more than 6 on q_proj: capped

    bigger = tmp_path / "bigger"
    tiny_llama(0, vocab_size=130).save_pretrained(bigger)
    cases = [
        ([ft, "--base", base, "-o", tmp_path / "out", "--rank", 4], "already exists; pass --overwrite"),
        ([ft, "--base", base, "-o", tmp_path / "o2"], "give --rank R"),
        ([ft, "--base", base, "-o", tmp_path / "o2", "--energy", "1.5"], "--energy must be in (0, 1]"),
        ([ft, "--base", base, "-o", tmp_path / "o2", "--rank", 4, "--modules", "qq_proj"], "--modules qq_proj: no Linear"),
        ([bigger, "--base", base, "-o", tmp_path / "o2", "--rank", 4], "weight is [130, 32] in"),
        ([tmp_path / "out", "--base", base, "-o", tmp_path / "o2", "--rank", 4], "not a full model folder"),
        ([base, "--base", base, "-o", tmp_path / "o2", "--rank", 4], "no selected weight differs"),
    ]
    for args, message in cases:
        r = _run("extract", *args, "--quiet")
        assert r.exit_code == 2 and message in r.output and r.output.startswith("Error: "), (args, r.output)
        assert r.output.count("\n") == 1
    assert not (tmp_path / "o2").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
