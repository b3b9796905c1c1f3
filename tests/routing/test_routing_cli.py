"""`peftmerge route build|eval` and `peftmerge predict` through click's CliRunner, incl. bad input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from peftmerge.cli.main import main
from routing_util import TASKS, save_base, sentences, task_adapter, write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    base = save_base(d / "base")
    ads = [str(task_adapter(d / t, t, base, seed=i + 1, samples=12)) for i, t in enumerate(TASKS)]
    queries = write_jsonl(d / "queries.jsonl", [{"id": i, "text": s} for i, s in
                                                enumerate(sentences("colors", 3, 9) + sentences("numbers", 3, 9))])
    return d, ads, queries


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_build_predict_eval(setup, tmp_path):
    d, ads, queries = setup
    r = run("route", "build", *ads, "--strategy", "probe", "--top-k", "2", "-o", tmp_path / "router")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "router" / "router.json").read_text())["params"]["top_k"] == 2
    r = run("predict", "--router", tmp_path / "router", "--input", queries, "-o", tmp_path / "p.jsonl",
            "--max-new-tokens", "3", "--quiet")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(6))
    assert [r["adapters"][0] for r in rows] == ["colors"] * 3 + ["numbers"] * 3
    assert all(len(r["weights"]) == 2 and abs(sum(r["weights"]) - 1) < 1e-5 and "output" in r for r in rows)
    r = run("predict", "--router", tmp_path / "router", "--input", queries, "-o", tmp_path / "p2.jsonl",
            "--mode", "fuse", "--max-new-tokens", "3", "--quiet")
    assert r.exit_code == 0, r.output
    fused = [json.loads(line) for line in (tmp_path / "p2.jsonl").read_text().splitlines()]
    assert [f["output"] for f in fused] == [r["output"] for r in rows]  # fuse and mixture are the same function
    data = [f"{t}={write_jsonl(tmp_path / (t + '.jsonl'), [{'text': s} for s in sentences(t, 10, 3)])}"
            for t in TASKS]
    r = run("route", "eval", "--router", tmp_path / "router", *sum((["--data", x] for x in data), []),
            "-o", tmp_path / "eval.json")
    assert r.exit_code == 0, r.output
    assert "overall:" in r.output and json.loads((tmp_path / "eval.json").read_text())["accuracy"] >= 0.9


def test_arrow_cli_records_weights(setup, tmp_path):
    d, ads, queries = setup
    assert run("route", "build", *ads, "--strategy", "arrow", "-o", tmp_path / "r").exit_code == 0
    r = run("predict", "--router", tmp_path / "r", "--input", queries, "-o", tmp_path / "p.jsonl", "--route-only")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert all(len(r["adapters"]) == 3 and abs(sum(r["weights"]) - 1) < 1e-5 and "output" not in r for r in rows)


def test_build_takes_every_router_parameter_as_an_option(setup, tmp_path):
    from peftmerge.routing.registry import parameters

    d, ads, _ = setup
    shown = run("route", "build", "--help").output
    assert all(f"--{name.replace('_', '-')}" in shown for name in parameters())
    r = run("route", "build", *ads, "--strategy", "probe", "--lr", "0.01", "--seed", "3", "--steps", "20",
            "-o", tmp_path / "r")
    assert r.exit_code == 0, r.output
    assert {k: v for k, v in json.loads((tmp_path / "r" / "router.json").read_text())["params"].items()
            if k in ("lr", "seed", "steps")} == {"lr": 0.01, "seed": 3, "steps": 20}


@pytest.mark.parametrize("args,message", [
    (["--strategy", "nope"], "unknown router 'nope'; choose one of: arrow, centroid, probe"),
    (["--strategy", "centroid", "--examples", "animals"], "is not NAME=FILE.jsonl"),
    (["--strategy", "centroid", "--examples", "birds=x.jsonl"], "no adapter has task 'birds'"),
    (["--strategy", "centroid", "--top-k", "0"], "top_k 0 is out of range"),
    (["--strategy", "arrow", "--hidden", "3"], "router arrow takes no parameter 'hidden'"),
    (["--strategy", "centroid", "--examples", "animals=missing.jsonl"], "missing.jsonl: no such data file"),
])
def test_build_bad_input(setup, tmp_path, args, message):
    d, ads, _ = setup
    r = run("route", "build", *ads, "-o", tmp_path / "r", *args)
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "r").exists()


def test_adapter_without_samples_is_refused(setup, tmp_path):
    d, ads, _ = setup
    bare = task_adapter(tmp_path / "bare", "bare", d / "base", seed=9, samples=0)
    r = run("route", "build", ads[0], bare, "-o", tmp_path / "r")
    assert r.exit_code == 2 and "adapter 'bare' has no example inputs" in r.output and "--examples bare=" in r.output


def test_predict_and_eval_bad_input(setup, tmp_path):
    d, ads, queries = setup
    assert run("route", "build", *ads, "-o", tmp_path / "r").exit_code == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "red"}\n{oops\n')
    r = run("predict", "--router", tmp_path / "r", "--input", bad, "-o", tmp_path / "p.jsonl")
    assert r.exit_code == 2 and "bad.jsonl:2: not valid JSON" in r.output
    nofield = write_jsonl(tmp_path / "nofield.jsonl", [{"label": 1}])
    r = run("predict", "--router", tmp_path / "r", "--input", nofield, "-o", tmp_path / "p.jsonl")
    assert r.exit_code == 2 and "no query text" in r.output
    r = run("predict", "--router", tmp_path / "nowhere", "--input", queries, "-o", tmp_path / "p.jsonl")
    assert r.exit_code == 2 and "no router.json" in r.output
    (tmp_path / "p.jsonl").write_text("keep\n")
    r = run("predict", "--router", tmp_path / "r", "--input", queries, "-o", tmp_path / "p.jsonl")
    assert r.exit_code == 2 and "already exists" in r.output and (tmp_path / "p.jsonl").read_text() == "keep\n"
    r = run("predict", "--router", tmp_path / "r", "--input", queries, "-o", tmp_path / "q.jsonl", "--mode", "arrow")
    assert r.exit_code == 2 and "does not fit a centroid router" in r.output
    r = run("route", "eval", "--router", tmp_path / "r", "--data", f"birds={queries}")
    assert r.exit_code == 2 and "no adapter for task 'birds'" in r.output


def test_eval_with_a_router_scores_label_words_with_the_routed_adapter(setup, tmp_path):
    """`peftmerge eval --router` on a label-word task answers each query with its routed adapter as that
    adapter is evaluated alone: its own template (with its task name and label words) filled in, and
    constrained scoring of its label words, equal to PEFT (base + that adapter) on the same prompt."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftmerge.data.tasks import Task
    from peftmerge.data.predict import label_scores
    from peftmerge.routing.api import predict_for_eval
    from routing_util import tokenizer

    d, ads, _ = setup
    template = "Task: {task}. Answer with one of: {labels}.\nText: {text}\nAnswer:"
    labels = {"animals": ["cat", "dog"], "colors": ["red", "blue", "green"], "numbers": ["one", "two"]}
    folders = []
    for i, t in enumerate(TASKS):  # copies of the fixture's adapters with a template and label words
        f = task_adapter(tmp_path / t, t, d / "base", seed=i + 1, samples=12)
        meta = json.loads((f / "peftmerge.json").read_text())
        (f / "peftmerge.json").write_text(json.dumps({**meta, "labels": labels[t], "template": template}))
        folders.append(str(f))
    assert run("route", "build", *folders, "--strategy", "centroid", "-o", tmp_path / "router").exit_code == 0
    rows = [{"text": s, "label": "red"} for s in sentences("colors", 4, 5) + sentences("numbers", 2, 5)]
    data = write_jsonl(tmp_path / "colors.jsonl", rows)
    r = run("predict", "--router", tmp_path / "router", "--input", data, "-o", tmp_path / "p.jsonl",
            "--route-only", "--quiet")
    assert r.exit_code == 0, r.output
    routed_to = [json.loads(line)["adapters"][0] for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(set(routed_to)) > 1  # the rows go to different adapters

    task = Task("colors", data, rows, ["red", "blue", "green"], None, {})
    got = predict_for_eval(str(tmp_path / "router"), None, task, progress=False)
    tok = tokenizer()
    for row, t, answer in zip(rows, routed_to, got):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(d / "base")),
                                          str(tmp_path / t)).eval()
        own = Task(t, data, [row], labels[t], template, {"task": t})
        with torch.no_grad():
            want = labels[t][int(label_scores(model, tok, own, progress=False).argmax())]
        assert answer == want


def test_eval_with_a_router_scores_the_routed_generations(setup, tmp_path):
    """On a free-text task `peftmerge eval --router` scores the same routed generations as `peftmerge predict`."""
    from peftmerge.evaluate import Settings, evaluate
    from peftmerge.evaluate.metrics import rouge_l

    d, ads, queries = setup
    assert run("route", "build", *ads, "--strategy", "centroid", "-o", tmp_path / "router").exit_code == 0
    rows = [{"instruction": s, "output": "cat dog red"} for s in sentences("colors", 4, 5)]
    data = write_jsonl(tmp_path / "colors.jsonl", rows)
    r = run("predict", "--router", tmp_path / "router", "--input", data, "-o", tmp_path / "p.jsonl",
            "--max-new-tokens", "128", "--quiet")
    assert r.exit_code == 0, r.output
    outs = [json.loads(line)["output"] for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    expected = rouge_l(outs, [r["output"] for r in rows])
    assert 0 < expected < 1  # the comparison below can fail both ways
    res = evaluate(str(d / "base"), {"colors": str(data)}, router=str(tmp_path / "router"),
                   settings=Settings(progress=False))
    assert res["tasks"]["colors"]["rougeL"] == pytest.approx(expected)
