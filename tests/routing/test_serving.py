"""``predict --emit adapter|names``: per query, the adapter a serving engine should be asked for; Arrow's
per-query form checked against the mean of its token weights recomputed from the layers' inputs."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from peftmerge.cli.main import main
from peftmerge.errors import PeftmergeError
from peftmerge.routing import api, engine_router
from peftmerge.routing.apply import RoutedLinear
from peftmerge.routing.arrow import arrow_weights
from peftmerge.routing.embed import encode
from peftmerge.routing.load import open_routed
from peftmerge.routing.router import load_router
from peftmerge.routing.serving import lora_modules
from routing_util import TASKS, save_base, sentences, task_adapter, write_jsonl

QUERIES = sentences("colors", 3, 9) + sentences("numbers", 2, 9) + sentences("animals", 2, 9)
EXPECTED = ["colors"] * 3 + ["numbers"] * 2 + ["animals"] * 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("serving")
    base = save_base(d / "base")
    ads = [str(task_adapter(d / t, t, base, seed=i + 1, samples=12)) for i, t in enumerate(TASKS)]
    queries = write_jsonl(d / "queries.jsonl", [{"id": f"q{i}", "text": s} for i, s in enumerate(QUERIES)])
    for strategy, extra in (("centroid", []), ("arrow", []), ("abstain", ["--abstain", "2"])):
        r = run("route", "build", *ads, "--strategy", "centroid" if strategy == "abstain" else strategy, *extra,
                "-o", d / strategy)
        assert r.exit_code == 0, r.output
    return d, queries


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_names_are_the_top1_task_of_a_query_router(setup, tmp_path):
    d, queries = setup
    r = run("predict", "--router", d / "centroid", "--input", queries, "-o", tmp_path / "p.jsonl", "--emit", "adapter")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["adapter"] for r in rows] == EXPECTED and [r["id"] for r in rows] == [f"q{i}" for i in range(7)]
    assert all(r["adapters"][0] == r["adapter"] and "output" not in r for r in rows)
    r = run("predict", "--router", d / "centroid", "--input", queries, "-o", tmp_path / "names.txt", "--emit", "names")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "names.txt").read_text().splitlines() == EXPECTED
    router = load_router(d / "centroid")
    assert lora_modules(router) == {t: str((d / t).resolve()) for t in TASKS}  # --lora-modules NAME=PATH
    assert engine_router(router)(QUERIES) == EXPECTED  # the in-memory twin, for a router in front of an engine


def test_an_abstaining_query_names_the_base_model(setup, tmp_path):
    d, queries = setup
    rows = api.predict(d / "abstain", queries, tmp_path / "p.jsonl", emit="adapter", progress=False)
    assert [r["adapter"] for r in rows] == [None] * 7 and all(r["abstained"] for r in rows)
    api.predict(d / "abstain", queries, tmp_path / "n.txt", emit="names", progress=False)
    assert (tmp_path / "n.txt").read_text() == "\n" * 7


def test_arrow_needs_its_per_query_form_and_says_so(setup, tmp_path):
    d, queries = setup
    r = run("predict", "--router", d / "arrow", "--input", queries, "-o", tmp_path / "n.txt", "--emit", "names")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "mixes adapters per token and layer" in r.output and "pass --per-query" in r.output
    assert not (tmp_path / "n.txt").exists()
    r = run("predict", "--router", d / "centroid", "--input", queries, "-o", tmp_path / "n.txt", "--emit", "names",
            "--per-query")
    assert r.exit_code == 2 and "drop --per-query" in r.output
    r = run("predict", "--router", d / "centroid", "--input", queries, "-o", tmp_path / "n.txt", "--per-query")
    assert r.exit_code == 2 and "use it with --emit adapter or names" in r.output
    r = run("predict", "--router", d / "centroid", "--input", queries, "-o", tmp_path / "n.txt", "--emit", "names",
            "--mode", "fuse")
    assert r.exit_code == 2 and "drop --mode" in r.output
    with pytest.raises(PeftmergeError, match="--emit 'label' is not one of answers, adapter, names"):
        api.predict(d / "centroid", queries, tmp_path / "n.txt", emit="label")


def test_arrow_per_query_names_the_largest_mean_token_weight(setup, tmp_path):
    d, queries = setup
    rows = api.predict(d / "arrow", queries, tmp_path / "p.jsonl", emit="adapter", per_query=True, progress=False)
    # reference: every adapted layer's input, Arrow's weights recomputed from it, averaged over the prompt tokens
    router = load_router(d / "arrow")
    routed, tokenizer = open_routed(router)
    enc = encode(tokenizer, QUERIES)
    mask = enc["attention_mask"].bool()
    p = router.params
    total = torch.zeros(len(QUERIES), len(router.tasks), dtype=torch.float64)
    layers = [m for m in routed.modules() if isinstance(m, RoutedLinear) and m.prototypes is not None]

    def hook(layer, args, _out):
        x = args[0]  # (B, L, d_in)
        w, idx = arrow_weights(x.reshape(-1, x.shape[-1]), layer.prototypes, p["top_k"], p["temperature"])
        experts = torch.tensor(layer.experts)[idx].reshape(*x.shape[:2], -1)  # (B, L, k)
        for row in range(x.shape[0]):
            for t in torch.nonzero(mask[row]).flatten().tolist():
                total[row, experts[row, t]] += w.reshape(*x.shape[:2], -1)[row, t].double()

    handles = [layer.register_forward_hook(hook) for layer in layers]
    with torch.no_grad():
        routed(enc["input_ids"], enc["attention_mask"], plan=routed.arrow_plan(p["top_k"], p["temperature"]))
    for h in handles:
        h.remove()
    mean = total / (len(layers) * mask.sum(1, keepdim=True))  # rows sum to 1: a mean weight per adapter
    torch.testing.assert_close(mean.sum(1), torch.ones(len(QUERIES), dtype=torch.float64))
    assert [r["adapter"] for r in rows] == [router.tasks[int(i)] for i in mean.argmax(1)]
    torch.testing.assert_close(torch.tensor([r["weights"][0] for r in rows], dtype=torch.float64),
                               mean.max(1).values / mean.topk(p["top_k"], dim=1).values.sum(1), atol=1e-5, rtol=0)
