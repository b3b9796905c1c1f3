"""Tiny offline models, tokenizers and data for the training tests (no Hub, no network)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

POS = ["good", "great", "fine", "nice", "happy", "love"]
NEG = ["bad", "awful", "poor", "sad", "hate", "worst"]
FILLER = ["the", "movie", "was", "a", "plot", "film", "very", "it", "and", "story", "acting", "this", "really"]
TEMPLATE_WORDS = (
    "Below is an instruction that describes a task paired with input provides further context Write response "
    "appropriately completes the request Instruction Input Response Task Answer with one of Text 2 positive "
    "negative user assistant system say hello world sst repeat tiny : . , # ### { } 1"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)


def make_tokenizer(kind: str = "causal"):
    """A WordLevel tokenizer over the test words; ``causal`` adds <s>, ``bert`` adds [CLS] ... [SEP]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "<s>", "</s>", "[CLS]", "[SEP]"]
    words = sorted(set(POS + NEG + FILLER + TEMPLATE_WORDS))
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "causal":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 2)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]",
                                       pad_token="[PAD]")
        fast.chat_template = CHAT_TEMPLATE
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 4), ("[SEP]", 5)]
        )
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]",
                                       pad_token="[PAD]")
    assert len(vocab) <= 128
    return fast


def make_llama(folder: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama (with biases, so BitFit has something to train) + tokenizer, saved to ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, attention_bias=True,
                      mlp_bias=True, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    make_tokenizer("causal").save_pretrained(folder)
    return folder


def make_bert(folder: Path, seed: int = 0) -> Path:
    """A 2-layer random BERT encoder (saved as ``BertModel``, like MiniLM) + tokenizer."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                     max_position_embeddings=128, pad_token_id=0, initializer_range=0.3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertModel(cfg).save_pretrained(folder)
    make_tokenizer("bert").save_pretrained(folder)
    return folder


def sentiment_rows(n: int, seed: int = 0, pair: bool = False) -> list[dict]:
    """Rows whose label is decided by the polar word in them."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["negative", "positive"])
        words = rng.sample(FILLER, 4) + [rng.choice(POS if label == "positive" else NEG)]
        rng.shuffle(words)
        row = {"text": " ".join(words), "label": label}
        if pair:
            row["text_pair"] = " ".join(rng.sample(FILLER, 3))
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
