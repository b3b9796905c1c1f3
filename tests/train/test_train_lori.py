"""LoRI training: A stays the random projection it was initialised to, B keeps exactly the configured density of
entries (the global magnitude mask of the official code), and the output is a plain PEFT LoRA that merges."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from train_fixtures import sentiment_rows, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peftmerge.errors import PeftmergeError  # noqa: E402
from peftmerge.train import TrainConfig, lori, train  # noqa: E402


def _config(model, data, out, **kw):
    base = dict(model=str(model), data=str(data), task="sst", out=str(out), method="lori", lr=2e-2, max_steps=4,
                calibration_steps=3, batch_size=8, dropout=0.0, logging_steps=1, eval_steps=100, r=4, alpha=8,
                scheduler="constant", density=0.25)
    base.update(kw)
    return TrainConfig(**base)


def _record_a(monkeypatch) -> dict:
    """Copies of every LoRA A right after the method froze it (the initial random projection)."""
    seen = {}
    freeze = lori.freeze_a

    def spy(model):
        n = freeze(model)
        seen.update({k: p.detach().clone() for k, p in model.named_parameters() if ".lora_A." in k})
        return n

    monkeypatch.setattr(lori, "freeze_a", spy)
    return seen


def _saved(out):
    """The saved adapter's A and B tensors, keyed by module."""
    sd = load_file(str(out / "adapter_model.safetensors"))
    a = {k.split(".lora_A")[0]: v for k, v in sd.items() if ".lora_A." in k}
    b = {k.split(".lora_B")[0]: v for k, v in sd.items() if ".lora_B." in k}
    assert a and a.keys() == b.keys()
    return a, b


@pytest.mark.parametrize("which,density", [("llama", 0.25), ("bert", 0.1), ("llama", 1.0)])
def test_a_frozen_and_b_at_the_configured_density(which, density, llama, bert, tmp_path, monkeypatch):
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    initial_a = _record_a(monkeypatch)
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(8, seed=1))
    kw = {"shape": "classify", "labels": ["negative", "positive"]} if which == "bert" else {}
    r = train(_config(llama if which == "llama" else bert, data, tmp_path / "out", density=density, **kw))

    # A: exactly the random projection it started as
    a, b = _saved(tmp_path / "out")
    start = {k.replace(".default", "").split(".lora_A")[0]: v for k, v in initial_a.items()}
    assert start.keys() == a.keys()
    for k, v in a.items():
        torch.testing.assert_close(v, start[k], rtol=0, atol=0)
    # B: exactly round(density * entries) nonzero entries over the whole model
    total = sum(t.numel() for t in b.values())
    nonzero = sum(int((t != 0).sum()) for t in b.values())
    assert nonzero == round(density * total), (nonzero, total)
    meta = json.loads((tmp_path / "out" / "peftmerge.json").read_text())
    assert meta["method"] == "lori" and meta["mergeable"] and meta["metrics"]["b_density"] == nonzero / total
    losses = [h["loss"] for h in r.history if "loss" in h]
    assert losses[-1] < losses[0], losses  # the (sparse) phase that wrote the adapter learned

    # a plain PEFT LoRA: loads with transformers + PEFT and gives the trained model's logits
    assert PeftConfig.from_pretrained(tmp_path / "out").peft_type.value == "LORA"
    if which == "llama":
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), tmp_path / "out").eval()
    else:
        plain = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
            bert, num_labels=2, pad_token_id=0), tmp_path / "out").eval()
    batch = r.tokenizer(["the movie was good", "bad film and plot"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, r.model(**batch).logits, rtol=0, atol=1e-5)


def test_lori_adapters_merge(llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftmerge.io.adapter import load_adapter
    from peftmerge.merge.combine import combine

    outs = []
    for i in range(2):
        data = write_jsonl(tmp_path / f"train{i}.jsonl", sentiment_rows(8, seed=10 + i))
        outs.append(train(_config(llama, data, tmp_path / f"a{i}", task=f"t{i}", seed=i, max_steps=3)).out)
    # task arithmetic of LoRI adapters = the sum of their dW (and the merge loads in PEFT)
    combine(outs, tmp_path / "ta", "task_arithmetic", weights=[1.0, 1.0], space="core", overwrite=True,
            progress=False)
    merged, ins = load_adapter(tmp_path / "ta"), [load_adapter(o) for o in outs]
    for name in ins[0].modules:
        want = ins[0].delta(name) + ins[1].delta(name)
        torch.testing.assert_close(merged.delta(name), want, rtol=1e-5, atol=1e-6)
    combine(outs, tmp_path / "ties", "ties", overwrite=True, progress=False)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), tmp_path / "ties").eval()
    with torch.no_grad():
        assert torch.isfinite(plain(input_ids=torch.tensor([[2, 10, 20, 30]])).logits).all()


def test_mask_matches_the_official_global_threshold():
    """Transcription of the official ``extract_mask.get_model_mask``: one threshold over the |B| of every module,
    the k-th largest with k = int((1 - sparsity) * total), kept where |B| >= threshold."""
    gen = torch.Generator().manual_seed(0)
    bs = {f"m{i}": torch.randn(shape, generator=gen) for i, shape in enumerate([(16, 4), (32, 4), (8, 4)])}
    for sparsity in (0.9, 0.5, 0.2):
        flat = torch.cat([b.abs().view(-1) for b in bs.values()])
        k = int((1 - sparsity) * flat.numel())
        threshold = torch.topk(flat, k).values[-1]
        official = {n: b.abs() >= threshold for n, b in bs.items()}
        ours = lori.magnitude_masks(bs, round(1 - sparsity, 6))
        for n in bs:
            assert torch.equal(ours[n], official[n]), (sparsity, n)


def test_masked_gradient_leaves_masked_entries_at_zero():
    b = torch.nn.Parameter(torch.zeros(6, 2))
    model = torch.nn.Module()
    lin = torch.nn.Linear(2, 6, bias=False)
    lin.lora_B = torch.nn.Module()
    lin.lora_B.default = torch.nn.Module()
    lin.lora_B.default.weight = b
    model.layer = lin
    mask = torch.tensor([[1, 0], [0, 0], [0, 1], [0, 0], [1, 1], [0, 0]], dtype=torch.bool)
    lori.apply_masks(model, {"layer.lora_B.default.weight": mask})
    opt = torch.optim.AdamW([b], lr=0.1, weight_decay=0.01)
    for _ in range(3):
        (b.sum() * torch.arange(12.0).view(6, 2)).sum().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(b.detach() != 0, mask)


def test_bad_density_and_resume_are_refused(llama, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(8, seed=1))
    with pytest.raises(PeftmergeError, match=r"density 0.0 is out of range: must be in \(0, 1\]"):
        _config(llama, data, tmp_path / "out", density=0.0).check()
    with pytest.raises(PeftmergeError, match="--resume: lori with density 0.25 calibrates its mask"):
        train(_config(llama, data, tmp_path / "out", resume=True))
