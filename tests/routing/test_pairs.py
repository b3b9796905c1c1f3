"""Sentence pairs are routed as the classifiers read them: ``(text, text_pair)`` encoded as a pair
(separator, token types), embeddings pooled at the right hidden state (layer 0 = the first layer's input)."""

from __future__ import annotations

import json

import pytest
import torch

from peftmerge.routing.api import _prompt
from peftmerge.routing.embed import Embedder, as_query, encode, pooled_hidden, record_query
from peftmerge.routing.load import examples_of
from peftmerge.train.data import sample_inputs

WORDS = "the a cat dog sat ran on mat park big small".split()


def bert_and_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(special + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]",
                                        model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=32, type_vocab_size=2, max_position_embeddings=32)
    return BertModel(cfg).eval(), tokenizer


def test_record_query_keeps_pairs():
    assert record_query({"text": "a cat", "text_pair": "the dog"}) == ("a cat", "the dog")
    assert record_query({"text": "a cat"}) == "a cat"
    assert record_query({"instruction": "do", "input": "it"}) == "do\nit"
    assert as_query(["a", "b"]) == ("a", "b") and as_query("a b") == "a b"


def test_encode_pads_mixed_pairs_and_texts_like_one_at_a_time():
    _, tok = bert_and_tokenizer()
    queries = [("the cat sat", "a dog ran"), "big mat", ("cat", "dog")]
    enc = encode(tok, queries)
    for row, q in enumerate(queries):
        one = tok(*((q,) if isinstance(q, str) else q))
        n = len(one["input_ids"])
        assert enc["input_ids"][row, :n].tolist() == one["input_ids"]
        assert enc["token_type_ids"][row, :n].tolist() == one["token_type_ids"]
        assert enc["attention_mask"][row].sum() == n
    assert enc["token_type_ids"][0].max() == 1  # the second sentence is segment B


@pytest.mark.parametrize("layer", [0, 1, 3, -1])
def test_pooled_hidden_is_the_mean_of_that_hidden_state(layer):
    model, tok = bert_and_tokenizer()
    enc = encode(tok, [("the cat sat on the mat", "a dog ran"), "big park"])
    with torch.no_grad():
        states = model(**enc, output_hidden_states=True).hidden_states
    h = states[layer]  # hidden_states[0] = embeddings incl. position and token type = the first layer's input
    m = enc["attention_mask"].unsqueeze(-1).float()
    want = (h * m).sum(1) / m.sum(1)
    got = pooled_hidden(model, enc["input_ids"], enc["attention_mask"], layer, enc["token_type_ids"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_pair_embeds_differently_from_its_joined_text():
    model, tok = bert_and_tokenizer()
    embed = Embedder(model, tok, layer=0)
    pair, joined = embed([("the cat sat", "a dog ran")]), embed(["the cat sat\na dog ran"])
    assert not torch.allclose(pair, joined)  # separator and segment-B token types are seen


@pytest.mark.parametrize("layer", [0, 2])
def test_segments_pool_each_part_of_a_pair_and_zero_for_a_single_text(layer):
    model, tok = bert_and_tokenizer()
    joint = Embedder(model, tok, layer=layer)
    seg = Embedder(model, tok, layer=layer, pairs="segments")
    got = seg([("the cat sat", "a dog ran"), "big park"])
    d = joint(["big park"]).shape[1]
    assert got.shape == (2, 2 * d)
    torch.testing.assert_close(got[:, :d], joint(["the cat sat", "big park"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0, d:], joint(["a dog ran"])[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[1, d:], torch.zeros(d))


def test_new_routers_embed_pairs_by_segments_and_old_ones_jointly():
    from peftmerge.routing.api import _pairs
    from peftmerge.routing.registry import get

    assert get("probe").resolve({})["pairs"] == "segments" == get("centroid").resolve({})["pairs"]

    class Old:
        params = {"layer": 0}  # a router.json written before the parameter existed

    assert _pairs(Old()) == "joint"


def test_samples_and_examples_keep_pairs(tmp_path):
    rows = [{"text": f"t{i}", "text_pair": f"p{i}", "label": "x"} for i in range(5)]
    samples = sample_inputs(rows, "labelled", 3, seed=0)
    assert all(isinstance(s, list) and s[0][1:] == s[1][1:] for s in samples)

    class Ad:
        task, path = "rte", tmp_path

    (tmp_path / "peftmerge.json").write_text(json.dumps({"task": "rte", "samples": samples + ["plain"]}))
    (tmp_path / "more.jsonl").write_text(json.dumps({"text": "u", "text_pair": "v"}) + "\n")
    got = examples_of([Ad()], {"rte": str(tmp_path / "more.jsonl")}, limit=10)["rte"]
    assert got == [tuple(s) for s in samples] + ["plain", ("u", "v")]
    assert examples_of([Ad()], {"rte": str(tmp_path / "more.jsonl")}, limit=2)["rte"] == [tuple(s) for s in samples[:2]]


def test_classification_prompt_is_the_pair_and_templates_still_fill():
    rec = {"text": "a cat", "text_pair": "the dog", "label": "x"}
    from peftmerge.routing.router import AdapterInfo

    assert _prompt(rec, None) == ("a cat", "the dog")
    assert _prompt(rec, AdapterInfo("t", "t", "classify", None, None)) == ("a cat", "the dog")
    assert _prompt(rec, AdapterInfo("t", "t", "text2text", None, "T: {text} / {text_pair}")) == "T: a cat / the dog"
    info = AdapterInfo("nli", "t", "text2text", ["yes", "no"], "Task: {task}. One of: {labels}.\n{text}\nAnswer:")
    assert _prompt(rec, info) == "Task: nli. One of: yes, no.\na cat\nAnswer:"
    assert _prompt({"instruction": "do", "input": "it"}, None) == "do\nit"


def test_pairs_reach_the_tokenizer_as_pairs_only_when_it_has_a_separator(tmp_path, monkeypatch):
    from routing_util import save_base, tokenizer
    from transformers import AutoModelForCausalLM

    import peftmerge.routing.embed as embed_module

    seen = []
    real = embed_module.encode
    monkeypatch.setattr(embed_module, "encode", lambda tok, qs, n=None: seen.append(qs) or real(tok, qs, n))
    bert, bert_tok = bert_and_tokenizer()
    Embedder(bert, bert_tok, layer=0)([("the cat", "a dog"), "big"])
    assert seen[-1] == [("the cat", "a dog"), "big"]  # BERT: [SEP] and token types
    base = save_base(tmp_path / "base")
    llama, tok = AutoModelForCausalLM.from_pretrained(str(base)).eval(), tokenizer()
    assert tok.sep_token is None
    Embedder(llama, tok, layer=1)([("cat dog", "red blue"), "one"])
    assert seen[-1] == ["cat dog\nred blue", "one"]  # a decoder LM would glue the pair: joined by a newline
