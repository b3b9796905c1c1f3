"""peftmerge search: optimisers find known optima; the searched merge is the written one; no test split."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from eval_fixtures import SENTIMENT, TOPIC, lora_adapter, save_bert, save_llama, tokenizer, write_task
from peftmerge.errors import PeftmergeError
from peftmerge.evaluate import Settings, evaluate
from peftmerge.search import optim, search

QUIET = Settings(progress=False)


def test_grid_finds_optimum_and_keeps_first_tie():
    f = lambda p: -(p["lambda"] - 0.7) ** 2 - (p["density"] - 0.2) ** 2  # noqa: E731
    best, score, trace = optim.grid(f, {"lambda": [0.3, 0.7, 1.0], "density": [0.1, 0.2, 0.4]})
    assert best == {"lambda": 0.7, "density": 0.2} and score == pytest.approx(0) and len(trace) == 9
    best, _, _ = optim.grid(lambda p: 1.0, {"lambda": [0.5, 1.0]})
    assert best == {"lambda": 0.5}


def test_evolution_strategy_converges_and_is_seeded():
    target = np.array([0.3, -0.7, 1.1])
    f = lambda x: -float(np.sum((x - target) ** 2))  # noqa: E731
    x, score, trace = optim.evolve(f, [1.0, 1.0, 1.0], budget=240, population=8, sigma=0.5, seed=3)
    assert np.abs(x - target).max() < 0.05 and len(trace) == 240
    assert trace[0]["x"] == [1.0, 1.0, 1.0]  # the start point is always evaluated: never worse than it
    assert optim.evolve(f, [1.0, 1.0, 1.0], budget=24, seed=3)[2] == optim.evolve(f, [1.0, 1.0, 1.0], budget=24,
                                                                                   seed=3)[2]


LW = ["the movie was good", "a dull film", "the plot was fun", "very bad actor", "the story", "a great game",
      "not good", "the team won", "stock price fell", "the rocket", "a fun film", "the market rose",
      "very dull", "the game was great", "a bad story", "not fun"]


def test_grid_search_recovers_the_lambda_that_made_the_labels(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftmerge.data.tasks import load_task
    from peftmerge.data.predict import predict_label_words
    from peftmerge.merge.combine import combine

    base = save_llama(tmp_path / "llama", seed=5)
    template = "Text: {text}\nAnswer ({choices}):"  # the adapters' recorded prompt (the tiny model varies under it)
    kw = dict(targets=("q_proj", "v_proj", "o_proj"), scale=0.5, labels=["good", "bad"], template=template)
    a = lora_adapter(base, tmp_path / "a", seed=11, task="lw", **kw)
    b = lora_adapter(base, tmp_path / "b", seed=12, task="other", **kw)
    # labels: what the exact task-arithmetic merge at lambda 0.5 predicts (through PEFT, not the search code)
    combine([a, b], tmp_path / "oracle", "task_arithmetic", lam=0.5, progress=False)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(tmp_path / "oracle")).eval()
    rows = [{"text": t, "label": "good"} for t in LW]
    task = load_task("lw", write_task(tmp_path / "tmp", rows, labels=["good", "bad"]), meta={"template": template})
    preds = predict_label_words(model, tokenizer("llama"), task, progress=False)
    assert 0 < preds.count("good") < len(preds)
    val = write_task(tmp_path / "lw", [{"text": t, "label": p} for t, p in zip(LW, preds)],
                     labels=["good", "bad"], name="validation.jsonl")

    r = search([a, b], tmp_path / "best", "task_arithmetic", data={"lw": val}, model=str(base),
               grid={"lambda": [0.0, 0.25, 0.5, 1.0, 1.5]}, progress=False)
    scores = {row["params"]["lambda"]: row["score"] for row in r["trace"]}
    assert scores[0.5] == 1.0 and max(v for k, v in scores.items() if k != 0.5) < 1.0
    assert r["best"]["params"]["lambda"] == 0.5
    report = json.loads((tmp_path / "best" / "merge_report.json").read_text())
    assert report["params"]["lambda"] == 0.5
    assert (tmp_path / "best" / "search_trace.png").stat().st_size > 1000
    assert json.loads((tmp_path / "best" / "search.json").read_text())["best"]["score"] == 1.0
    assert evaluate(str(base), {"lw": val}, adapter=str(tmp_path / "best"), settings=QUIET)["tasks"]["lw"][
        "accuracy"] == 1.0


def test_searched_ties_with_heads_equals_written_merge(tmp_path, monkeypatch):
    import peftmerge.data.tasks as data_mod

    base = save_bert(tmp_path / "bert")
    a = lora_adapter(base, tmp_path / "a", seed=1, task="sent", labels=["negative", "positive"], classify=True,
                     scale=0.5)
    b = lora_adapter(base, tmp_path / "b", seed=2, task="topic", labels=["sports", "business", "tech"],
                     classify=True, scale=0.5)
    d1 = write_task(tmp_path / "sent", SENTIMENT, name="validation.jsonl")
    d2 = write_task(tmp_path / "topic", TOPIC, name="validation.jsonl")
    for folder, rows in ((tmp_path / "sent", SENTIMENT), (tmp_path / "topic", TOPIC)):
        write_task(folder, rows[:2], name="test.jsonl")  # present beside validation, must never be read
    read = []
    original = data_mod.read_jsonl
    monkeypatch.setattr(data_mod, "read_jsonl", lambda p, limit=None: read.append(str(p)) or original(p, limit))

    r = search([a, b], tmp_path / "best", "ties", data={"sent": d1, "topic": d2}, model=str(base),
               strategy="es", budget=5, population=4, seed=1, lam=0.8, progress=False)
    assert len(r["trace"]) == 5 and r["trace"][0]["weights"] == [1.0, 1.0]
    assert not any("test" in p.rsplit("/", 1)[-1] for p in read) and read
    assert set(r["individual"]) == {"sent", "topic"}
    got = evaluate(str(base), {"sent": d1, "topic": d2}, adapter=str(tmp_path / "best"), settings=QUIET)
    for t in ("sent", "topic"):  # the in-memory candidate is exactly the adapter combine wrote
        assert got["tasks"][t]["accuracy"] == pytest.approx(r["best"]["tasks"][t])
    assert json.loads((tmp_path / "best" / "merge_report.json").read_text())["weights"] == pytest.approx(
        r["best"]["weights"], abs=1e-6)


def test_search_refuses_test_split(tmp_path, adapters):
    data = write_task(tmp_path / "x", SENTIMENT[:2])
    with pytest.raises(PeftmergeError, match="looks like a test split"):
        search(adapters, tmp_path / "o", data={"x": data})
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["--data", "x=DIR/test.jsonl"], "looks like a test split"),
    (["--data", "x=DIR/validation.jsonl", "--grid", "bogus=1,2"], "has no searchable parameter 'bogus'"),
    (["--data", "x=DIR/validation.jsonl", "--grid", "lambda"], "is not NAME=V1,V2"),
    (["--data", "x=DIR/validation.jsonl", "--method", "cat"], "has no parameter to grid over"),
    ([], "no --data"),
])
def test_cli_search_bad_input_exit_2(tmp_path, adapters, args, message):
    from peftmerge.cli.main import main

    write_task(tmp_path, SENTIMENT[:2], name="validation.jsonl")
    args = [x.replace("DIR", str(tmp_path)) for x in args]
    res = CliRunner().invoke(main, ["search", *map(str, adapters), "-o", str(tmp_path / "o"), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_a_grid_over_the_space_keeps_its_names():
    from peftmerge.merge import registry
    from peftmerge.search.search import _axes, parse_grid

    grid = parse_grid(["space=full,core,knots", "density=0.2,0.4"])
    assert grid == {"space": ["full", "core", "knots"], "density": [0.2, 0.4]}
    assert _axes(grid, registry.get("ties")) == grid
    assert _axes(None, registry.get("ties")) == {"lambda": list(registry.LAMBDA.grid), "density": [0.1, 0.2, 0.4, 0.7]}
    with pytest.raises(PeftmergeError, match="space 'cores' is not one of full, core, knots"):
        _axes(parse_grid(["space=cores"]), registry.get("ties"))
