"""Each training method trains (the loss falls), saves, and reloads with identical logits."""

from __future__ import annotations

import json
import os

import pytest
import torch

from train_fixtures import make_llama, sentiment_rows, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peftmerge.train import TrainConfig, load_trained, methods, train  # noqa: E402

# Learning rates that move each method clearly within a few steps on the tiny random model.
LR = {"lora": 2e-2, "qlora": 2e-2, "dora": 2e-2, "prompt_tuning": 0.3, "ia3": 0.3, "bitfit": 2e-2, "llama_adapter": 0.1,
      "full": 1e-2}


def _config(model, data, out, method, **kw):
    # 8 rows, batch 8, no dropout: every step sees the same batch, so step losses are comparable.
    base = dict(model=str(model), data=str(data), task="sst", out=str(out), method=method, lr=LR[method],
                max_steps=6, batch_size=8, dropout=0.0, logging_steps=1, eval_steps=100, num_virtual_tokens=4,
                adapter_layers=2, r=4, alpha=8, scheduler="constant")
    base.update(kw)
    return TrainConfig(**base)


def _losses(result):
    return [h["loss"] for h in result.history if "loss" in h]


def test_registry_names_and_unknown():
    assert methods.names() == ["lora", "qlora", "dora", "lori", "prompt_tuning", "ia3", "llama_adapter", "bitfit", "full",
                               "context_distillation"]
    assert [m for m in methods.names() if methods.get(m).mergeable] == ["lora", "qlora", "dora", "lori",
                                                                             "context_distillation"]
    with pytest.raises(Exception, match="unknown method 'lorax'; choose one of: lora, qlora"):
        methods.get("lorax")


@pytest.mark.parametrize("method", list(LR))
def test_method_trains_and_reloads(method, llama, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(8, seed=1))
    r = train(_config(llama, data, tmp_path / "out", method))
    losses = _losses(r)
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.02, losses

    meta = json.loads((tmp_path / "out" / "peftmerge.json").read_text())
    assert meta["method"] == method and meta["shape"] == "text2text" and meta["task"] == "sst"
    assert meta["labels"] == ["negative", "positive"] and meta["label_words"] == {"negative": " negative", "positive": " positive"}
    assert sorted(meta["samples"]) == sorted(row["text"] for row in sentiment_rows(8, seed=1))
    assert meta["mergeable"] == methods.get(method).mergeable
    assert (tmp_path / "out" / "README.md").read_text().count("base_model") >= 1
    assert not (tmp_path / ".out.checkpoints").exists()

    reloaded, tok, _ = load_trained(tmp_path / "out")
    batch = tok(["the movie was good", "bad film and plot"], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = r.model(**batch).logits
        got = reloaded(**batch).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_lora_adapter_loads_in_plain_peft(llama, tmp_path):
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(8, seed=2))
    r = train(_config(llama, data, tmp_path / "out", "lora", target_modules="all-linear", rslora=True))
    cfg = PeftConfig.from_pretrained(tmp_path / "out")
    assert cfg.peft_type.value == "LORA" and cfg.r == 4 and cfg.use_rslora
    assert {m.rsplit(".", 1)[-1] for m in cfg.target_modules} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), tmp_path / "out").eval()
    base = AutoModelForCausalLM.from_pretrained(llama).eval()
    x = torch.tensor([[2, 10, 20, 30, 40]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).logits, r.model(input_ids=x).logits, rtol=0, atol=1e-5)
        assert (plain(input_ids=x).logits - base(input_ids=x).logits).abs().max() > 1e-3


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_classification_head_and_labels_round_trip(which, bert, llama, tmp_path):
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForSequenceClassification

    model = bert if which == "bert" else llama
    labels = ["world", "sports", "business"]
    rows = [{"text": r["text"], "label": labels[i % 3]} for i, r in enumerate(sentiment_rows(9, seed=3))]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    r = train(_config(model, data, tmp_path / "out", "lora", shape="classify", labels=labels, validation=str(data),
                      max_steps=4, eval_steps=2, eval_before=True))
    meta = json.loads((tmp_path / "out" / "peftmerge.json").read_text())
    assert meta["shape"] == "classify" and meta["labels"] == labels and meta["template"] is None
    assert {"eval_loss", "eval_accuracy", "eval_macro_f1", "eval_loss_before", "train_loss"} <= set(meta["metrics"])
    head = "classifier" if which == "bert" else "score"
    cfg = PeftConfig.from_pretrained(tmp_path / "out")
    assert head in cfg.modules_to_save
    # Rebuild with plain transformers + PEFT: the head is restored from the adapter, labels from peftmerge.json.
    base = AutoModelForSequenceClassification.from_pretrained(
        model, num_labels=3, id2label=dict(enumerate(meta["labels"])), ignore_mismatched_sizes=True, pad_token_id=0)
    plain = PeftModel.from_pretrained(base, tmp_path / "out").eval()
    assert plain.config.id2label == {0: "world", 1: "sports", 2: "business"}
    ids = r.tokenizer(["the movie was good"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(plain(**ids).logits, r.model(**ids).logits, rtol=0, atol=1e-5)
    reloaded, _, _ = load_trained(tmp_path / "out")
    assert reloaded.config.id2label[2] == "business"


def test_full_fine_tuning_with_a_head_trains_every_weight(bert, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(8, seed=5))
    r = train(_config(bert, data, tmp_path / "out", "full", shape="classify", max_steps=3))
    assert all(p.requires_grad for p in r.model.parameters())
    before = AutoModelForSequenceClassification.from_pretrained(bert, num_labels=2, ignore_mismatched_sizes=True)
    changed = {n for n, p in r.model.named_parameters()
               if n in dict(before.named_parameters()) and not torch.equal(p, dict(before.named_parameters())[n])}
    assert {n for n in changed if n.startswith("bert.encoder.layer.0.")} >= {
        "bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.output.dense.weight"}
    # the output is a whole model any transformers code loads, tokenizer included
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    reloaded, _, meta = load_trained(tmp_path / "out")
    assert meta["method"] == "full" and meta["mergeable"] is False
    ids = tok(["the movie was good", "bad film"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(**ids).logits, r.model(**ids).logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(reloaded(**ids).logits, r.model(**ids).logits, rtol=0, atol=1e-5)


def test_qlora_base_is_4bit_nf4_on_cpu(llama, tmp_path):
    import bitsandbytes as bnb

    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(8, seed=4))
    r = train(_config(llama, data, tmp_path / "out", "qlora", max_steps=2))
    layer = r.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_state.quant_type == "nf4"


def test_bitfit_refuses_a_model_without_biases(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from train_fixtures import make_tokenizer

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "nobias")
    make_tokenizer().save_pretrained(tmp_path / "nobias")
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(4))
    with pytest.raises(Exception, match="bitfit: LlamaForCausalLM has no bias parameters"):
        train(_config(tmp_path / "nobias", data, tmp_path / "out", "bitfit"))
    assert not (tmp_path / "out").exists()


def test_resume_continues_from_the_last_checkpoint(llama, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(8, seed=6))
    ckpt = tmp_path / "ckpt"
    first = train(_config(llama, data, tmp_path / "a", "lora", max_steps=4, eval_steps=2, checkpoint_dir=str(ckpt),
                          keep_checkpoints=True))
    assert (ckpt / "checkpoint-4").is_dir() and first.meta["metrics"]["train_steps"] == 4
    other = write_jsonl(tmp_path / "other.jsonl", sentiment_rows(8, seed=7))
    second = train(_config(llama, other, tmp_path / "b", "lora", max_steps=6, eval_steps=2, checkpoint_dir=str(ckpt),
                           resume=True))
    # Steps 1-4 come back from the checkpoint (trained on the first data), only 5-6 ran on the new data.
    assert [h["step"] for h in second.history if "loss" in h] == [1, 2, 3, 4, 5, 6]
    assert _losses(second)[:4] == _losses(first) and second.meta["metrics"]["train_steps"] == 6 and not ckpt.exists()
    with pytest.raises(Exception, match="--resume: no checkpoint in"):
        train(_config(llama, data, tmp_path / "c", "lora", checkpoint_dir=str(tmp_path / "none"), resume=True))


def test_training_args_select_best_checkpoint_and_early_stopping(tmp_path):
    from peftmerge.train.trainer import training_args

    cfg = TrainConfig(model="m", data="d", task="t", out=str(tmp_path / "o"), max_steps=50, early_stopping=2)
    args = training_args(cfg, has_eval=True, shape="classify")
    assert args.eval_strategy == "steps" and args.eval_steps == 10 and args.save_steps == 10
    assert args.load_best_model_at_end and args.metric_for_best_model == "accuracy" and args.greater_is_better
    args = training_args(TrainConfig(model="m", data="d", task="t", out="o", epochs=2, keep="best"), has_eval=True,
                         shape="text2text")
    assert args.eval_strategy == "epoch" and args.metric_for_best_model == "loss" and not args.greater_is_better
    assert training_args(cfg, has_eval=False, shape="classify").eval_strategy == "no"


@pytest.mark.parametrize("targets,embeddings", [(["q_proj", "v_proj"], False), (["q_proj", "embed_tokens"], True)])
def test_saving_an_adapter_never_asks_the_hub(tmp_path, monkeypatch, targets, embeddings):
    """A base recorded by its Hub id must not make PEFT's save look the id up online (to see whether the vocabulary
    was resized): the embedding matrices are saved exactly where an embedding layer is adapted."""
    import peft.utils.save_and_load as peft_save
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    def no_hub(*args, **kwargs):
        raise AssertionError("PEFT asked the Hub while saving")

    monkeypatch.setattr(peft_save, "check_file_exists_on_hf_hub", no_hub)
    base = AutoModelForCausalLM.from_pretrained(make_llama(tmp_path / "llama"))
    config = TrainConfig(model="org/remote-only-base", data="x", out="y", r=2, target_modules=targets)
    model = methods.get("lora").build(base, config, "CAUSAL_LM")
    model.peft_config["default"].base_model_name_or_path = "org/remote-only-base"
    out, checkpoint = tmp_path / "out", tmp_path / "checkpoint"
    out.mkdir()
    methods.save_trained(model, methods.get("lora"), out)
    model.save_pretrained(str(checkpoint))  # as the Trainer saves its checkpoints
    for folder in (out, checkpoint):
        saved = load_file(str(folder / "adapter_model.safetensors"))
        assert any("embed_tokens" in k and "lora_" not in k for k in saved) == embeddings
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
    reloaded = PeftModel.from_pretrained(fresh, str(out))
    ids = torch.tensor([[5, 6, 7]])
    assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-6)
