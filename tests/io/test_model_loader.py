"""The one base-model loader (peftmerge.io.model_loader): training, evaluation and routing load a base alike."""

from __future__ import annotations

import pytest
import torch

from train_fixtures import make_bert, make_llama, make_tokenizer

from peftmerge.errors import PeftmergeError
from peftmerge.evaluate import model as eval_model
from peftmerge.io import model_loader
from peftmerge.routing.load import load_base


def _three_ways(base, shape: str):
    """(model, tokenizer) as training, evaluation and routing load ``base``."""
    src, gguf = model_loader.resolve(str(base))
    tok = model_loader.load_tokenizer(src, gguf)
    trained = model_loader.load_model(src, gguf, shape, num_labels=2 if shape == "classify" else None)
    kind = "seqcls" if shape == "classify" else "causal"
    evaluated = eval_model.load_model(str(base), kind, num_labels=2 if shape == "classify" else None)
    routed, routed_tok = load_base(str(base), classify=shape == "classify", num_labels=2)
    return [(trained, tok), (evaluated, eval_model.load_tokenizer(str(base))), (routed, routed_tok)]


def test_train_eval_and_routing_load_the_same_base(tmp_path):
    base = make_llama(tmp_path / "llama")
    loaded = _three_ways(base, "text2text")
    first = loaded[0][0].state_dict()
    for model, tok in loaded:
        assert type(model).__name__ == "LlamaForCausalLM" and tok.pad_token == "[PAD]"
        assert all(torch.equal(first[k], v) and v.dtype == torch.float32 for k, v in model.state_dict().items())


def test_a_tokenizer_without_pad_or_eos_pads_with_unk_everywhere(tmp_path):
    base = make_bert(tmp_path / "bert")
    tok = make_tokenizer("bert")
    tok.pad_token = None
    tok.save_pretrained(base)
    for model, tok in _three_ways(base, "classify"):
        assert tok.pad_token == "[UNK]" and model.config.num_labels == 2


@pytest.mark.parametrize("bad,message", [("./no-model", "no such folder"), ("missing.gguf", "no such GGUF file")])
def test_a_missing_base_is_one_line_naming_it(bad, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for load in (model_loader.resolve, eval_model.load_tokenizer, load_base):
        with pytest.raises(PeftmergeError, match=f"^base model {bad}: {message}"):
            load(bad)


def test_a_fresh_head_loads_without_a_load_report_and_other_reports_stay(tmp_path, capfd):
    """The library is as quiet as the CLI where the missing head is what was asked for (a fresh classifier); the
    caller's transformers verbosity is left as it was."""
    from transformers.utils import logging as hf_logging

    base = make_bert(tmp_path / "bert")
    before = hf_logging.get_verbosity()
    capfd.readouterr()
    model = model_loader.load_model(str(base), None, "classify", labels=["negative", "positive"])
    assert model.config.num_labels == 2
    assert "MISSING" not in capfd.readouterr().err
    assert hf_logging.get_verbosity() == before
    with pytest.raises(RuntimeError), model_loader.quiet_report():
        raise RuntimeError("restored on error too")
    assert hf_logging.get_verbosity() == before
