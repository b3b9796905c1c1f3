"""The adapter writer: adapter_config.json is written without importing peft, and PEFT reads it as the adapter it
is (ranks per module, scaling folded into the factors, heads, fan_in_fan_out): the merged adapter's logits in PEFT
equal the base model with each module's dW added by hand."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch
from peft import LoraConfig, PeftModel

from conftest import gpt2_adapter, make_adapter, tiny_gpt2, tiny_llama
from peftmerge.io.adapter import load_adapter
from peftmerge.io.adapter_writer import lora_config
from peftmerge.merge.combine import combine


def test_a_merge_never_imports_peft(tmp_path):
    a = make_adapter(tmp_path / "a", seed=1, r=4)
    b = make_adapter(tmp_path / "b", seed=2, r=2, targets=("q_proj", "o_proj"))
    code = textwrap.dedent(f"""
        import sys
        from peftmerge.merge.combine import combine
        combine([{str(a)!r}, {str(b)!r}], {str(tmp_path / "m")!r}, "ties", progress=False)
        print(sorted(m for m in ("peft", "transformers") if m in sys.modules))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-1] == "[]", r.stdout
    assert (tmp_path / "m" / "adapter_config.json").exists()


def test_peft_reads_the_config_as_written():
    ranks = {"model.layers.0.self_attn.q_proj": 6, "model.layers.1.self_attn.v_proj": 2, "model.embed_tokens": 3}
    d = lora_config(ranks, base_model="org/base", task_type="CAUSAL_LM", bias="lora_only", modules_to_save=["score"])
    cfg = LoraConfig(**{k: v for k, v in d.items() if k != "peft_type"})
    assert (cfg.r, cfg.lora_alpha, cfg.task_type, cfg.base_model_name_or_path) == (6, 6, "CAUSAL_LM", "org/base")
    assert set(cfg.target_modules) == set(ranks) and cfg.bias == "lora_only" and cfg.modules_to_save == ["score"]
    for name, r in ranks.items():  # every module's rank, and scaling alpha / r = 1 everywhere
        assert cfg.rank_pattern.get(name.replace(".", r"\."), cfg.r) == r
        assert cfg.alpha_pattern.get(name.replace(".", r"\."), cfg.lora_alpha) == r


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_peft_loads_a_merge_of_different_ranks_as_the_sum_of_its_task_vectors(tmp_path):
    a = make_adapter(tmp_path / "a", seed=1, r=4, alpha=8, targets=("q_proj", "v_proj", "embed_tokens"))
    b = make_adapter(tmp_path / "b", seed=2, r=2, alpha=3, targets=("q_proj", "o_proj"), use_rslora=True)
    combine([a, b], tmp_path / "m", "task_arithmetic", weights=[0.5, 1.5], progress=False)
    config = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["rank_pattern"]  # q_proj 6, v_proj 4, o_proj 2, embed 4
    ref = tiny_llama(0)
    with torch.no_grad():
        for w, x in ((0.5, load_adapter(a)), (1.5, load_adapter(b))):
            for name, m in x.modules.items():
                delta = x.delta(name)
                ref.get_submodule(name).weight += w * (delta.T if m.transposed else delta)
    merged = PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "m")).eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(merged, ids), _logits(ref, ids), atol=1e-4, rtol=1e-4)


def test_peft_loads_a_conv1d_merge_with_fan_in_fan_out(tmp_path):
    # Conv1D only: GPT-2 ties its embedding to its output layer, which PEFT leaves at W0 (see io/test_adapter_variants)
    a = gpt2_adapter(tmp_path / "a", 1, r=4, targets=("c_attn", "c_proj"))
    b = gpt2_adapter(tmp_path / "b", 2, r=3, targets=("c_attn",))
    combine([a, b], tmp_path / "m", "cat", progress=False)
    assert json.loads((tmp_path / "m" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    ref = tiny_gpt2()
    with torch.no_grad():
        for x in (load_adapter(a), load_adapter(b)):
            for name, m in x.modules.items():
                delta = x.delta(name)
                ref.get_submodule(name).weight += delta.T if m.transposed else delta
    merged = PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "m")).eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(merged, ids), _logits(ref, ids), atol=1e-4, rtol=1e-4)
