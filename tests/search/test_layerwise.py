"""search --strategy layerwise: per-layer coefficients, the loss it learns on, and the merge it writes."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from eval_fixtures import SENTIMENT, lora_adapter, save_llama, tokenizer, write_task
from peftmerge.errors import PeftmergeError
from peftmerge.evaluate import Settings, evaluate
from peftmerge.data.tasks import load_task
from peftmerge.merge.combine import combine
from peftmerge.merge.plan import open_inputs, plan_modules
from peftmerge.search import layerwise, search
from peftmerge.search.inmemory import InMemoryMerge
from peftmerge.search.search import Evaluator
from peftmerge.merge import registry

QUIET = Settings(progress=False)


def test_groups_by_block_index_or_module():
    names = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.output.dense",
             "bert.encoder.layer.11.attention.self.query", "bert.pooler.dense"]
    assert layerwise.groups(names, "layer") == ["layer 0", "layer 0", "layer 11", "bert.pooler.dense"]
    assert layerwise.groups(names, "module") == names
    assert [layerwise.short_name(g) for g in layerwise.groups(names, "module")] == [
        "0 self.query", "0 output.dense", "11 self.query", "pooler.dense"]


def test_each_step_holds_a_batch_of_every_task_and_small_tasks_cycle():
    from peftmerge.data.tasks import Task

    big = Task("big", None, [{"i": i} for i in range(10)], ["x"])
    small = Task("small", None, [{"i": i} for i in range(3)], ["x"])
    epoch = layerwise.steps([big, small], 4, seed=1)
    assert len(epoch) == 3 and all([t.name for t, _ in step] == ["big", "small"] for step in epoch)
    seen_big = [r["i"] for step in epoch for r in step[0][1]]
    assert sorted(seen_big[:10]) == list(range(10))  # the largest task: each row once (then it wraps)
    seen_small = [r["i"] for step in epoch for r in step[1][1]]
    assert [len(rows) for _, rows in epoch[0]] == [4, 3] and sorted(seen_small[:3]) == [0, 1, 2]
    assert seen_small[:3] == seen_small[3:6]  # cycles in the same shuffled order
    assert layerwise.steps([big, small], 4, seed=1) == epoch and layerwise.steps([big, small], 4, seed=2) != epoch


def _setup(base, inputs, data, **kw):
    adapters = open_inputs(inputs)
    plans = plan_modules(adapters)
    tasks = [load_task(t, p, meta=json.loads((a / "peftmerge.json").read_text()))
             for (t, p), a in zip(data.items(), inputs)]
    ev = Evaluator(str(base), adapters, plans, tasks, batch_size=4, max_length=32, max_new_tokens=4)
    merger = InMemoryMerge(adapters, plans, registry.get("task_arithmetic"))
    deltas = {p.name: merger.deltas(p) for p in plans}
    return adapters, plans, tasks, ev, deltas


def test_combine_module_weights_is_the_per_module_weighted_sum(bert_pair, tmp_path):
    base, inputs, _ = bert_pair
    adapters = open_inputs(inputs)
    plans = plan_modules(adapters)
    named = {plans[0].name: [0.7, -0.2], plans[3].name: [0.0, 1.5]}
    combine(inputs, tmp_path / "m", "task_arithmetic", weights=[0.5, 0.25], module_weights=named, progress=False)
    (merged,) = open_inputs([tmp_path / "m"])
    for plan in plans:
        a, b = merged.scaled_factors(plan.name)
        c = named.get(plan.name, [0.5, 0.25])
        want = sum(ci * (bi @ ai) for ci, (ai, bi) in zip(c, (x.scaled_factors(plan.name) for x in adapters)))
        torch.testing.assert_close(b @ a, want, rtol=1e-5, atol=1e-6)
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert report["module_weights"][plans[0].name] == pytest.approx([0.7, -0.2])
    with pytest.raises(PeftmergeError, match="do not have"):
        combine(inputs, tmp_path / "x", "task_arithmetic", module_weights={"nope": [1, 1]}, progress=False)
    with pytest.raises(PeftmergeError, match="2 inputs"):
        combine(inputs, tmp_path / "x", "task_arithmetic", module_weights={plans[0].name: [1]}, progress=False)
    assert not (tmp_path / "x").exists()


def test_head_loss_is_the_merged_models_loss_and_its_gradient(bert_pair):
    base, inputs, data = bert_pair
    adapters, plans, tasks, ev, deltas = _setup(base, inputs, data)
    names = [p.name for p in plans]
    index = {n: k for k, n in enumerate(dict.fromkeys(layerwise.groups(names, "layer")))}
    index = {n: index[g] for n, g in zip(names, layerwise.groups(names, "layer"))}
    coef = torch.tensor([[0.4, 0.9, 0.2], [0.6, -0.3, 1.1]])[:, :max(index.values()) + 1]
    task = tasks[1]
    key, head = ev.plan[task.name]
    model, patcher = ev.models[key]
    layerwise.load_plain_head(model, head)
    model.requires_grad_(False)
    params = layerwise.patched_params(patcher.targets, layerwise.merged_deltas(coef, deltas, index))
    got = layerwise.head_loss(model, ev.tokenizer, task, task.rows, params, 32)
    # reference: the same deltas patched into the weights in place, model called as usual
    by_hand = {n: sum(coef[i, index[n]] * deltas[n][i] for i in range(2)) for n in names}
    patcher.apply(by_hand)
    enc = ev.tokenizer([r["text"] for r in task.rows], padding=True, return_tensors="pt")
    y = torch.tensor([task.labels.index(r["label"]) for r in task.rows])
    want = torch.nn.functional.cross_entropy(model(**enc).logits, y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # autograd's gradient against central differences of the loss (float64: the loss is far from linear)
    model.double()
    patcher.targets = {k: (w, w0.double(), t) for k, (w, w0, t) in patcher.targets.items()}
    deltas = {k: v.double() for k, v in deltas.items()}
    coef = coef.double()

    def loss_at(c):
        params = layerwise.patched_params(patcher.targets, layerwise.merged_deltas(c, deltas, index))
        return layerwise.head_loss(model, ev.tokenizer, task, task.rows, params, 32)

    c = coef.clone().requires_grad_(True)
    loss_at(c).backward()
    h = 1e-4
    for i in range(2):
        for g in range(coef.shape[1]):
            e = torch.zeros_like(coef)
            e[i, g] = h
            fd = (float(loss_at(coef + e)) - float(loss_at(coef - e))) / (2 * h)
            assert c.grad[i, g].item() == pytest.approx(fd, rel=1e-2, abs=1e-4)


def test_answer_loss_is_the_gold_answers_token_nll(tmp_path):
    base = save_llama(tmp_path / "llama", seed=3)
    a = lora_adapter(base, tmp_path / "a", seed=4, task="lw", labels=["good", "bad"], targets=("q_proj", "v_proj"),
                     scale=0.5)
    rows = [{"text": "the movie was good", "label": "good"}, {"text": "a dull film very bad", "label": "bad"}]
    data = {"lw": write_task(tmp_path / "lw", rows, labels=["good", "bad"], name="validation.jsonl")}
    adapters, plans, tasks, ev, deltas = _setup(base, [a], data)
    model, patcher = ev.models[("causal", None)]
    params = layerwise.patched_params(patcher.targets, {n: 0.5 * d[0] for n, d in deltas.items()})
    got = layerwise.answer_loss(model, ev.tokenizer, tasks[0], tasks[0].rows, params, 64)
    # by hand: one unpadded sequence per row, log p of each answer token, averaged over all answer tokens
    from peftmerge.data.prompts import answer_of, prompt_of

    patcher.apply({n: 0.5 * d[0] for n, d in deltas.items()})
    nll = []
    tok = tokenizer("llama")
    for row in rows:
        prompt = prompt_of(tasks[0], row)
        p, c = tok(prompt)["input_ids"], tok(answer_of(prompt, row["label"]), add_special_tokens=False)["input_ids"]
        logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0], -1)
        nll += [-logp[len(p) - 1 + k, t] for k, t in enumerate(c)]
    torch.testing.assert_close(got, torch.stack(nll).mean(), rtol=1e-5, atol=1e-5)


def test_layerwise_search_learns_writes_what_it_scored_and_never_reads_test(bert_pair, tmp_path, monkeypatch):
    import peftmerge.data.tasks as data_mod

    base, inputs, data = bert_pair
    for name in ("sent", "topic"):
        write_task(tmp_path / name, SENTIMENT[:2], name="test.jsonl")  # beside validation: must never be read
    read = []
    original = data_mod.read_jsonl
    monkeypatch.setattr(data_mod, "read_jsonl", lambda p, limit=None: read.append(str(p)) or original(p, limit))
    r = search(inputs, tmp_path / "best", "task_arithmetic", data=data, model=str(base), strategy="layerwise",
               epochs=6, lr=0.2, batch_size=4, max_length=32, progress=False)
    assert read and not any("test" in p.rsplit("/", 1)[-1] for p in read)
    trace = r["trace"]
    assert [row["epoch"] for row in trace] == list(range(7)) and trace[0]["loss"] is None
    assert trace[0]["coefficients"] == [[0.3] * len(r["groups"])] * 2
    assert trace[-1]["loss"] < trace[1]["loss"]  # Adam lowers the validation loss it descends
    assert r["best"]["score"] == max(row["score"] for row in trace)
    assert r["groups"] == ["layer 0", "layer 1", "bert.pooler.dense"]
    got = evaluate(str(base), data, adapter=str(tmp_path / "best"), settings=QUIET)
    for t in data:  # the written adapter is the coefficients that scored best
        assert got["tasks"][t]["accuracy"] == pytest.approx(r["best"]["tasks"][t])
    report = json.loads((tmp_path / "best" / "merge_report.json").read_text())
    q0 = next(k for k in report["module_weights"] if ".layer.0." in k)
    assert report["module_weights"][q0] == pytest.approx([row[0] for row in r["best"]["coefficients"]], abs=1e-6)
    assert (tmp_path / "best" / "search_trace.png").stat().st_size > 1000
    again = search(inputs, tmp_path / "again", "task_arithmetic", data=data, model=str(base), strategy="layerwise",
                   epochs=2, lr=0.2, batch_size=4, max_length=32, progress=False)
    assert again["trace"][2]["coefficients"] == trace[2]["coefficients"]  # seeded: same batches, same steps


@pytest.mark.parametrize("args, message", [
    (["--method", "ties"], "use --method task_arithmetic or regmean"),
    (["--method", "task_arithmetic", "--epochs", "0"], "--epochs >= 1"),
])
def test_cli_layerwise_bad_input_exit_2(bert_pair, tmp_path, args, message):
    from peftmerge.cli.main import main

    base, inputs, data = bert_pair
    res = CliRunner().invoke(main, ["search", *map(str, inputs), "-o", str(tmp_path / "o"), "--strategy",
                                    "layerwise", "--data", f"sent={data['sent']}", "--model", str(base), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_cli_layerwise_average_writes_the_mean_of_the_last_half_of_the_epochs(bert_pair, tmp_path):
    from peftmerge.cli.main import main

    base, inputs, data = bert_pair
    res = CliRunner().invoke(main, ["search", *map(str, inputs), "-o", str(tmp_path / "avg"), "--strategy",
                                    "layerwise", "--method", "task_arithmetic", "--epochs", "5", "--lr", "0.2",
                                    "--batch-size", "4", "--max-length", "32", "--average", "--model", str(base),
                                    *[x for t, p in data.items() for x in ("--data", f"{t}={p}")]])
    assert res.exit_code == 0, res.output
    assert "for the mean of 3-5" in res.output
    r = json.loads((tmp_path / "avg" / "search.json").read_text())
    tail = torch.tensor([row["coefficients"] for row in r["trace"][3:]])
    assert [row["epoch"] for row in r["trace"]] == list(range(6)) and r["settings"]["average"] is True
    assert r["best"]["epoch"] == "mean of 3-5"
    assert torch.allclose(torch.tensor(r["best"]["coefficients"]), tail.mean(0), atol=1e-6)
    assert not torch.allclose(tail[0], tail[-1])  # the epochs differ, so the mean is not one of them
    report = json.loads((tmp_path / "avg" / "merge_report.json").read_text())
    q0 = next(k for k in report["module_weights"] if ".layer.0." in k)
    assert report["module_weights"][q0] == pytest.approx([row[0] for row in r["best"]["coefficients"]], abs=1e-6)
    got = evaluate(str(base), data, adapter=str(tmp_path / "avg"), settings=QUIET)
    for t in data:  # the written adapter scores what the search recorded for the mean
        assert got["tasks"][t]["accuracy"] == pytest.approx(r["best"]["tasks"][t])
