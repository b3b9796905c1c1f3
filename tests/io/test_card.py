"""Model cards on their own: metadata and body round-trip through huggingface_hub's ModelCard.load."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard

from peftmerge import __version__
from peftmerge.io.card import KINDS, load_results, make_card, with_results, write_card
from peftmerge.errors import PeftmergeError

RECIPE = {
    "method": "ties",
    "params": {"density": 0.2, "lambda": 1.0},
    "inputs": [{"source": "bob/sst2-lora", "revision": "a" * 40, "weight": 0.6},
               {"path": "/data/agnews", "sha256": "f" * 64, "weight": 0.4}],
}

EXPECTED = {  # kind -> (base_model_relation, library_name, tags that must be there, tags that must not)
    "adapter": ("adapter", "peft", {"peftmerge", "lora", "ties"}, {"merge", "router"}),
    "merged-adapter": ("merge", "peft", {"peftmerge", "merge", "lora", "ties"}, {"router"}),
    "merged-model": ("merge", "transformers", {"peftmerge", "merge", "lora", "ties"}, {"router"}),
    "router": ("adapter", None, {"peftmerge", "lora", "router", "ties"}, {"merge"}),
}


def recipe_block(card: ModelCard) -> dict:
    return json.loads(card.text.split("## Recipe")[1].split("```json")[1].split("```")[0])


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_each_kind(tmp_path, kind):
    path = write_card(tmp_path, kind=kind, base_model="HuggingFaceTB/SmolLM2-135M", recipe=RECIPE,
                      results={"sst2": {"accuracy": 0.875}}, tags=("sentiment", "lora"), datasets=["glue"],
                      title="My output")
    assert path == tmp_path / "README.md"
    card = ModelCard.load(path)
    relation, library, must, must_not = EXPECTED[kind]
    d = card.data
    assert d.base_model == "HuggingFaceTB/SmolLM2-135M" and d.base_model_relation == relation
    assert d.library_name == library and d.datasets == ["glue"]
    assert must | {"sentiment"} <= set(d.tags) and not must_not & set(d.tags)
    assert len(d.tags) == len(set(d.tags))  # "lora" given twice appears once
    assert card.text.lstrip().startswith("# My output")
    recipe = recipe_block(card)
    assert recipe == {**RECIPE, "peftmerge_version": __version__}
    assert f"| `bob/sst2-lora` | 0.6 | revision `{'a' * 40}` |" in card.text
    assert f"| `/data/agnews` | 0.4 | sha256 `{'f' * 64}` |" in card.text
    assert "| sst2 | 0.8750 |" in card.text
    # save/load is stable: the metadata a second load sees is the same
    card.save(tmp_path / "again.md")
    assert ModelCard.load(tmp_path / "again.md").data.to_dict() == d.to_dict()


def test_a_local_base_model_path_stays_out_of_the_metadata(tmp_path):
    local = tmp_path / "base"
    local.mkdir()
    for path in (str(local), "/opt/models/llama", "./base", "~/m/base"):
        card = make_card(kind="merged-adapter", base_model=path)
        assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()
        assert f"Base model: `{path}`." in card.text and "local path" in card.text
    both = make_card(kind="merged-adapter", base_model=["org/base", str(local)])
    assert both.data.base_model == ["org/base"] and both.data.base_model_relation == "merge"
    assert not (tmp_path / "gpt2").exists() and make_card(kind="adapter", base_model="gpt2").data.base_model == "gpt2"
    snapshot = f"{tmp_path}/hub/models--HuggingFaceTB--SmolLM2-135M/snapshots/{'a' * 40}"  # a resolved Hub id
    assert make_card(kind="adapter", base_model=snapshot).data.base_model == "HuggingFaceTB/SmolLM2-135M"


def test_no_base_model_no_relation_no_results():
    card = make_card(kind="merged-adapter", base_model=None)
    assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()
    assert "## Results" not in card.text and recipe_block(card) == {"peftmerge_version": __version__}
    assert card.data.datasets is None


def test_results_both_formats_and_from_results_json(tmp_path):
    plain = {"sst2": {"accuracy": 0.5, "n": 8}, "agnews": {"accuracy": 0.25}}
    a = make_card(kind="adapter", base_model=None, results=plain)
    b = make_card(kind="adapter", base_model=None, results={"tasks": plain, "model": "x"})
    assert a.text == b.text
    assert "| task | accuracy | n |" in a.text and "| sst2 | 0.5000 | 8 |" in a.text and "| agnews | 0.2500 |  |" in a.text
    (tmp_path / "results.json").write_text(json.dumps({"tasks": plain}))
    assert load_results(tmp_path / "results.json") == plain
    write_card(tmp_path, kind="adapter", base_model=None)  # picks up results.json by itself
    assert "| sst2 | 0.5000 | 8 |" in ModelCard.load(tmp_path / "README.md").text
    assert load_results(tmp_path / "absent.json") is None


def test_bad_results_and_kind(tmp_path):
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(PeftmergeError, match=r"results.json: not valid JSON"):
        write_card(tmp_path, kind="adapter", base_model=None)
    (tmp_path / "results.json").write_text(json.dumps({"sst2": 0.5}))
    with pytest.raises(PeftmergeError, match=r"results.json: results must be \{task: \{metric: value\}\}"):
        load_results(tmp_path / "results.json")
    with pytest.raises(PeftmergeError, match="unknown output kind 'lora'; valid kinds: adapter, merged-adapter"):
        make_card(kind="lora", base_model=None)


def test_with_results_replaces_only_the_results_section():
    card = make_card(kind="merged-adapter", base_model="org/base", recipe=RECIPE, results={"a": {"acc": 0.1}})
    card = ModelCard(card.content.rstrip("\n") + "\n\n## Notes\n\nkeep me\n")
    updated = with_results(card, {"tasks": {"b": {"acc": 0.9}}})
    assert "| b | 0.9000 |" in updated.text and "| a | 0.1000 |" not in updated.text
    assert updated.text.count("## Results") == 1 and "## Notes\n\nkeep me" in updated.text
    assert updated.data.to_dict() == card.data.to_dict() and recipe_block(updated) == recipe_block(card)
    fresh = with_results(make_card(kind="adapter", base_model=None), {"c": {"f1": 1}})
    assert fresh.text.rstrip().endswith("| c | 1 |")


def _usage(readme) -> str:
    text = readme.read_text()
    return text.split("## Usage\n\n```python\n", 1)[1].split("```", 1)[0]


def test_classifier_cards_show_a_snippet_that_loads_a_tasks_head(bert_pair, tmp_path, monkeypatch):
    """A merged classification adapter's usage snippet runs as written (the Hub download replaced by the local
    folder) and gives the model with that task's head; a causal adapter keeps the causal-LM snippet."""
    import huggingface_hub
    import torch

    from conftest import make_adapter
    from peftmerge.io.heads import load_merged
    from peftmerge.merge.combine import combine
    from transformers import AutoModelForSequenceClassification

    base, inputs, _ = bert_pair
    out = tmp_path / "merged"
    combine(inputs, out, "task_arithmetic", progress=False)
    code = _usage(out / "README.md")
    assert "num_labels=2" in code and '"sent")' in code and "heads: " not in code and "sent, topic" in code
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo: str(out))
    scope: dict = {}
    exec(code.replace("REPO_ID", "user/merged"), scope)
    ids = {"input_ids": torch.tensor([[2, 10, 11, 3]])}
    want = load_merged(AutoModelForSequenceClassification.from_pretrained(base, num_labels=2), out, "sent")
    torch.testing.assert_close(scope["model"](**ids).logits, want(**ids).logits)
    write_card(inputs[1], kind="adapter", base_model=str(base))
    single = _usage(inputs[1] / "README.md")
    assert "AutoModelForSequenceClassification" in single and "num_labels=3" in single
    causal = make_adapter(tmp_path / "causal")
    write_card(causal, kind="adapter", base_model="tiny-llama")
    assert "AutoModelForCausalLM" in _usage(causal / "README.md")
