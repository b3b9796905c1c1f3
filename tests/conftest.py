"""Shared fixtures: tiny random models and LoRA adapters built offline from configs."""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*kernels.*")

import pytest  # noqa: E402
import torch  # noqa: E402


def tiny_llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, pad_token_id=0)
    base.update(kw)
    return LlamaConfig(**base)


def tiny_llama(seed: int = 0, cls=None, **kw):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = (cls or LlamaForCausalLM)(tiny_llama_config(**kw))
    return model.eval()


def make_adapter(folder, *, seed=1, r=4, alpha=8, targets=("q_proj", "v_proj"), model_seed=0, cls=None,
                 task_type=None, base_name="tiny-llama", model_kw=None, **lora_kw):
    """Save a LoRA adapter with random (non-zero) A and B on the tiny Llama; returns its folder."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(model_seed, cls=cls, **({"num_labels": 3} if task_type == "SEQ_CLS" else {}), **(model_kw or {}))
    model.name_or_path = base_name
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False,
                     task_type=task_type, **lora_kw)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n or "score" in n:
                p.copy_(torch.randn_like(p) * 0.2)
    peft_model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A saved tiny random Llama with biases (train_fixtures.make_llama), one per test module; a module may define its
    own ``llama``."""
    from train_fixtures import make_llama

    return make_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A saved tiny random BERT encoder (train_fixtures.make_bert), one per test module."""
    from train_fixtures import make_bert

    return make_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture
def adapters(tmp_path):
    """Three adapters of different ranks/alphas on the same tiny Llama."""
    return [
        make_adapter(tmp_path / "a", seed=1, r=4, alpha=8),
        make_adapter(tmp_path / "b", seed=2, r=2, alpha=4, targets=("q_proj", "v_proj", "o_proj")),
        make_adapter(tmp_path / "c", seed=3, r=6, alpha=3, use_rslora=True),
    ]


@pytest.fixture
def bert_pair(tmp_path):
    """A tiny BERT encoder with two classification adapters (sent: 2 labels, topic: 3) and their validation rows:
    (base folder, [adapter folders], {task: validation.jsonl})."""
    from eval_fixtures import SENTIMENT, TOPIC, lora_adapter, save_bert, write_task

    base = save_bert(tmp_path / "bert")
    kw = dict(classify=True, scale=0.5, targets=("query", "value", "dense"))
    a = lora_adapter(base, tmp_path / "a", seed=1, task="sent", labels=["negative", "positive"], **kw)
    b = lora_adapter(base, tmp_path / "b", seed=2, task="topic", labels=["sports", "business", "tech"], **kw)
    d1 = write_task(tmp_path / "sent", SENTIMENT, name="validation.jsonl")
    d2 = write_task(tmp_path / "topic", TOPIC, name="validation.jsonl")
    return base, [a, b], {"sent": d1, "topic": d2}


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)).eval()


def gpt2_adapter(folder, seed, r=4, targets=("c_attn", "wte")):
    """A LoRA adapter on GPT-2's Conv1D (fan_in_fan_out) and embedding layers."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(tiny_gpt2(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                fan_in_fan_out=True, init_lora_weights=False))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.2)
    pm.save_pretrained(str(folder))
    return folder
