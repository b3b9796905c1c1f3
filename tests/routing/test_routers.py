"""Query routers: centroid and probe route held-out queries of separable tasks to the right adapter;
abstain gives the base model; a router survives a save/load round trip (and a move of its folder)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from routing_util import TASKS, save_base, sentences, task_adapter, write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("routers")
    base = save_base(d / "base")
    ads = [task_adapter(d / "adapters" / t, t, base, seed=i + 1, samples=12) for i, t in enumerate(TASKS)]
    held_out = {t: str(write_jsonl(d / f"{t}.jsonl", [{"text": s} for s in sentences(t, 30, seed=7)]))
                for t in TASKS}
    return d, ads, held_out


@pytest.mark.parametrize("strategy,params", [("centroid", {}), ("centroid", {"layer": 0}), ("probe", {}),
                                             ("probe", {"params": {"hidden": 16}})])
def test_routes_held_out_queries_to_their_task(setup, strategy, params, tmp_path):
    from peftmerge.routing import route_build, route_eval

    d, ads, held_out = setup
    out = tmp_path / "router"
    route_build([str(a) for a in ads], out, strategy, **params)
    report = route_eval(out, held_out, progress=False)
    assert report["accuracy"] >= 0.9, report
    for task, r in report["tasks"].items():
        assert r["n"] == 30 and r["accuracy"] >= 0.8, (task, report)


def test_examples_files_add_to_the_samples(setup, tmp_path):
    from peftmerge.routing import route_build
    from peftmerge.routing.load import examples_of, open_adapters

    d, ads, held_out = setup
    extra = write_jsonl(tmp_path / "more.jsonl", [{"text": "cat dog"}, {"instruction": "count", "input": "one"}])
    got = examples_of(open_adapters(ads), {"animals": str(extra)})
    assert got["animals"][-2:] == ["cat dog", "count\none"] and len(got["colors"]) == 12
    router = route_build([str(a) for a in ads], tmp_path / "r", "centroid", examples={"animals": str(extra)})
    assert router.tensors["centroids"].shape[0] == 3


def test_abstain_answers_with_the_base_model(setup, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftmerge.routing import predict, route_build

    d, ads, held_out = setup
    router = route_build([str(a) for a in ads], tmp_path / "r", "centroid", abstain=1.5)  # cosine < 1.5 always
    rows = predict(router, held_out["colors"], tmp_path / "p.jsonl", max_new_tokens=4, progress=False)
    assert all(r["abstained"] and r["adapters"] == [] for r in rows)
    model = AutoModelForCausalLM.from_pretrained(str(d / "base")).eval()
    tok = AutoTokenizer.from_pretrained(str(d / "base"))
    enc = tok([json.loads(line)["text"] for line in open(held_out["colors"])][:8], return_tensors="pt",
              padding=True, padding_side="left")
    with torch.no_grad():
        seqs = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0)
    want = tok.batch_decode(seqs[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert [r["output"] for r in rows[:8]] == want
    routed = predict(route_build([str(a) for a in ads], tmp_path / "r2", "centroid"), held_out["colors"],
                     tmp_path / "p2.jsonl", max_new_tokens=4, progress=False)
    assert [r["output"] for r in routed[:8]] != want  # the routed adapters do change the answers


def test_router_round_trip_and_move(setup, tmp_path):
    from peftmerge.routing import load_router, route_build, route_queries
    from peftmerge.routing.embed import record_text
    from peftmerge.routing.load import load_base, load_embedder

    d, ads, held_out = setup
    router = route_build([str(a) for a in ads], d / "adapters" / "router", "probe", top_k=2, temperature=0.5)
    files = sorted(p.name for p in (d / "adapters" / "router").iterdir())
    assert files == ["README.md", "router.json", "router.safetensors"]
    assert "router" in (d / "adapters" / "router" / "README.md").read_text()
    moved = tmp_path / "elsewhere"
    shutil.copytree(d / "adapters", moved)
    loaded = load_router(moved / "router")
    assert loaded.strategy == "probe" and loaded.params == router.params and loaded.tasks == list(TASKS)
    assert [a.path for a in loaded.adapters] == [str((moved / t).resolve()) for t in TASKS]
    assert loaded.tensors.keys() == router.tensors.keys()
    for k in router.tensors:
        assert torch.equal(loaded.tensors[k], router.tensors[k])
    base, tok = load_base(str(d / "base"))
    embed = load_embedder(None, base, tok, router.params["layer"], router.params["pairs"])
    texts = [record_text(json.loads(line)) for line in open(held_out["numbers"])][:10]
    a, b = route_queries(router, texts, embed=embed), route_queries(loaded, texts, embed=embed)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)
    assert a.indices.shape == (10, 2) and torch.allclose(a.weights.sum(1), torch.ones(10))
