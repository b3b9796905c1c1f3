"""Tiny offline models, tokenizers, adapters and task files for the eval / search / inspect tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ("the a movie film was is good bad great awful very not fun dull plot actor story team won lost game "
         "market stock rose fell price science space planet rocket question answer text label choices positive "
         "negative sports business world tech yes no : , ( ) . ? \n").split(" ")


def tokenizer(kind: str = "llama"):
    """A WordLevel tokenizer over WORDS (whitespace split), with BOS for llama and [CLS]/[SEP] for bert."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"] if kind == "llama" else ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + sorted({w for w in WORDS if w.strip()}))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "llama":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", 2)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                       bos_token="<s>", eos_token="</s>")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def bert_config(**kw):
    from transformers import BertConfig

    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=96,
                max_position_embeddings=64, num_labels=2)
    base.update(kw)
    return BertConfig(**base)


def save_bert(folder, seed=0, head=None, num_labels=2):
    """A tiny BERT folder: a BertForSequenceClassification whose classifier is ``head=(weight, bias)``, or an
    encoder without a head (``head=None``, like MiniLM) that adapters put their own heads on."""
    from transformers import BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    if head is None:
        model = BertModel(bert_config()).eval()
        model.save_pretrained(folder)
        tokenizer("bert").save_pretrained(folder)
        return Path(folder)
    model = BertForSequenceClassification(bert_config(num_labels=num_labels)).eval()
    if head is not None:
        with torch.no_grad():
            model.classifier.weight.copy_(head[0])
            model.classifier.bias.copy_(head[1])
    model.save_pretrained(folder)
    tokenizer("bert").save_pretrained(folder)
    return Path(folder)


def save_llama(folder, seed=0, zero_lm_head=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=256, pad_token_id=0,
                      bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    if zero_lm_head:
        with torch.no_grad():
            model.lm_head.weight.zero_()
    model.save_pretrained(folder)
    tokenizer("llama").save_pretrained(folder)
    return Path(folder)


def lora_adapter(base_folder, out, *, seed=1, task=None, labels=None, classify=False, r=4,
                 targets=("query", "value"), scale=0.3, template=None, num_labels=None):
    """A LoRA adapter with random A, B (and head) on a saved tiny base, plus a peftmerge.json like train's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if classify:
        model = AutoModelForSequenceClassification.from_pretrained(base_folder, num_labels=num_labels or len(labels))
    else:
        model = AutoModelForCausalLM.from_pretrained(base_folder)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False,
                     task_type="SEQ_CLS" if classify else "CAUSAL_LM")
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn_like(p) * scale)
    peft_model.save_pretrained(str(out))
    if task:
        meta = {"task": task, "shape": "classify" if classify else "text2text", "labels": labels,
                "template": template, "base_model": str(base_folder), "samples": [], "metrics": {}}
        (Path(out) / "peftmerge.json").write_text(json.dumps(meta))
    return Path(out)


def write_task(folder, rows, labels=None, name="test.jsonl"):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    if labels:
        (folder / "task.json").write_text(json.dumps({"labels": labels}))
    return folder / name


SENTIMENT = [
    {"text": "the movie was good", "label": "positive"},
    {"text": "the film was awful", "label": "negative"},
    {"text": "a great story", "label": "positive"},
    {"text": "very dull plot", "label": "negative"},
    {"text": "the actor was great", "label": "positive"},
    {"text": "not fun", "label": "negative"},
    {"text": "a good film", "label": "positive"},
    {"text": "the story is bad", "label": "negative"},
]

TOPIC = [
    {"text": "the team won the game", "label": "sports"},
    {"text": "stock price fell", "label": "business"},
    {"text": "the rocket is in space", "label": "tech"},
    {"text": "the market rose", "label": "business"},
    {"text": "a planet in space", "label": "tech"},
    {"text": "the team lost", "label": "sports"},
]
