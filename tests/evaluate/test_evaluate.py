"""peftmerge eval: metrics by hand, head / label-word / generation predictions against unbatched references."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from eval_fixtures import SENTIMENT, TOPIC, lora_adapter, save_bert, save_llama, tokenizer, write_task
from peftmerge.errors import PeftmergeError
from peftmerge.evaluate import Settings, evaluate, metrics
from peftmerge.data.tasks import Task, icl_examples, load_task
from peftmerge.data.prompts import with_demos

QUIET = Settings(progress=False, batch_size=3)


def test_metrics_by_hand():
    preds = ["a", "a", "b", "c", "a"]
    refs = ["a", "b", "b", "c", "c"]
    assert metrics.accuracy(preds, refs) == pytest.approx(3 / 5)
    # a: tp1 fp2 fn0 -> 2/4; b: tp1 fp0 fn1 -> 2/3; c: tp1 fp0 fn1 -> 2/3
    assert metrics.macro_f1(preds, refs) == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)
    from sklearn.metrics import f1_score

    assert metrics.macro_f1(preds, refs) == pytest.approx(f1_score(refs, preds, average="macro"))
    # a prediction outside the task's label set (a misrouted query answered with another task's head) is an
    # error of its true class, not a class of its own: macro-F1 over the task's labels only
    preds, refs = ["a", "world", "b", "b"], ["a", "a", "b", "b"]
    assert metrics.macro_f1(preds, refs, ["a", "b"]) == pytest.approx(f1_score(refs, preds, labels=["a", "b"],
                                                                                average="macro"))
    assert metrics.macro_f1(preds, refs, ["a", "b"]) == pytest.approx((2 / 3 + 1) / 2)
    assert metrics.exact_match([" x ", "y"], ["x", "z"]) == 0.5
    # LCS("the cat sat", "the cat sat down") = 3: P = 1, R = 3/4, F = 2PR/(P+R) = 6/7; second pair shares nothing
    assert metrics.rouge_l(["the cat sat", "dog"], ["the cat sat down", "bird"]) == pytest.approx((6 / 7 + 0) / 2)


def test_constant_head_accuracy_by_hand(tmp_path):
    # classifier weight 0, bias (0, 5): every row is predicted as label 1 ("positive")
    base = save_bert(tmp_path / "bert", head=(torch.zeros(2, 32), torch.tensor([0.0, 5.0])))
    rows = SENTIMENT[:5]  # 3 positive, 2 negative
    data = write_task(tmp_path / "sent", rows, labels=["negative", "positive"])
    r = evaluate(str(base), {"sent": data}, settings=QUIET)
    assert r["tasks"]["sent"]["accuracy"] == pytest.approx(3 / 5)
    # positive: tp 3, fp 2, fn 0 -> F1 6/8; negative: tp 0, fp 0, fn 2 -> 0
    assert r["tasks"]["sent"]["macro_f1"] == pytest.approx(0.375)


def _manual_head(base, adapter, rows, labels, head_task=None):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from peftmerge.io.heads import load_merged

    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(labels))
    if head_task:  # a merged folder: heads of different sizes, one per task in heads/
        model = load_merged(model, adapter, head_task)
    else:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    tok = tokenizer("bert")
    with torch.no_grad():
        return [labels[int(model(**tok(r["text"], return_tensors="pt")).logits.argmax())] for r in rows]


def test_adapter_and_merged_heads_match_unbatched_reference(tmp_path):
    from peftmerge.merge.combine import combine

    base = save_bert(tmp_path / "bert")
    sent_labels, topic_labels = ["negative", "positive"], ["sports", "business", "tech"]
    a = lora_adapter(base, tmp_path / "a", seed=1, task="sent", labels=sent_labels, classify=True)
    b = lora_adapter(base, tmp_path / "b", seed=2, task="topic", labels=topic_labels, classify=True)
    sent = write_task(tmp_path / "d1", SENTIMENT)
    topic = write_task(tmp_path / "d2", TOPIC)
    merged = tmp_path / "merged"
    combine([a, b], merged, "task_arithmetic", progress=False)

    r = evaluate(str(base), {"sent": sent, "topic": topic}, adapter=str(merged),
                 reference={"sent": a, "topic": b}, settings=QUIET)
    for task, rows, labels, single in (("sent", SENTIMENT, sent_labels, a), ("topic", TOPIC, topic_labels, b)):
        refs = [x["label"] for x in rows]
        want_ind = metrics.accuracy(_manual_head(base, single, rows, labels), refs)
        want_mer = metrics.accuracy(_manual_head(base, merged, rows, labels, head_task=task), refs)
        assert r["baselines"]["individual"]["tasks"][task]["accuracy"] == pytest.approx(want_ind)
        assert r["tasks"][task]["accuracy"] == pytest.approx(want_mer)
        assert r["tasks"][task]["normalized"] == pytest.approx(want_mer / want_ind if want_ind else math.nan,
                                                               nan_ok=True)
    assert r["name"] == "task_arithmetic" and r["n_tasks"] == 2
    # the individual row of an earlier run is reused as it is
    (tmp_path / "r.json").write_text(json.dumps(r))
    again = evaluate(str(base), {"sent": sent}, adapter=str(merged), reference_results=tmp_path / "r.json",
                     settings=QUIET)
    assert again["tasks"]["sent"] == r["tasks"]["sent"]


def test_head_adapter_refuses_other_task(tmp_path):
    base = save_bert(tmp_path / "bert")
    a = lora_adapter(base, tmp_path / "a", task="sent", labels=["negative", "positive"], classify=True)
    data = write_task(tmp_path / "d", SENTIMENT)
    with pytest.raises(PeftmergeError, match="trained for task sent, not other"):
        evaluate(str(base), {"other": data}, adapter=str(a), settings=QUIET)


LW_ROWS = [{"text": "good movie", "label": "good"}, {"text": "bad movie", "label": "very bad"},
           {"text": "the plot", "label": "good"}, {"text": "dull", "label": "very bad"},
           {"text": "fun film", "label": "very bad"}]


def test_label_words_uniform_lm_picks_shorter_word(tmp_path):
    # lm_head = 0: every token has log p = -log V, so the one-token "good" beats the two-token "very bad"
    base = save_llama(tmp_path / "llama", zero_lm_head=True)
    data = write_task(tmp_path / "d", LW_ROWS, labels=["good", "very bad"])
    r = evaluate(str(base), {"lw": data}, settings=QUIET)
    assert r["tasks"]["lw"]["accuracy"] == pytest.approx(2 / 5)


def _manual_label_scores(model, tok, task, demos=()):
    out = []
    with torch.no_grad():
        for row in task.rows:
            prompt = with_demos(task, row, list(demos))
            p = tok(prompt)["input_ids"]
            scores = []
            for label in task.labels:
                c = tok(" " + label, add_special_tokens=False)["input_ids"]
                logp = torch.log_softmax(model(torch.tensor([p + c])).logits[0], -1)
                scores.append(sum(float(logp[len(p) - 1 + j, c[j]]) for j in range(len(c))))
            out.append(task.labels[max(range(len(scores)), key=scores.__getitem__)])
    return out


def test_label_words_and_icl_match_unbatched_reference(tmp_path):
    from transformers import AutoModelForCausalLM

    base = save_llama(tmp_path / "llama", seed=3)
    data = write_task(tmp_path / "d", LW_ROWS, labels=["good", "very bad"])
    train = write_task(tmp_path / "d", LW_ROWS + LW_ROWS[:2], name="train.jsonl")
    adapter = lora_adapter(base, tmp_path / "lw", task="lw", labels=["good", "very bad"],
                           targets=("q_proj", "v_proj"), template="Review: {text}\nVerdict:")
    r = evaluate(str(base), {"lw": data}, adapter=str(adapter), zero_shot=True, icl_shots=2,
                 train={"lw": train}, settings=QUIET)
    task = load_task("lw", data, meta=json.loads((adapter / "peftmerge.json").read_text()))
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    tok = tokenizer("llama")
    refs = task.references()
    assert r["baselines"]["base"]["tasks"]["lw"]["accuracy"] == pytest.approx(
        metrics.accuracy(_manual_label_scores(model, tok, task), refs))
    demos = icl_examples(load_task("lw", train), 2, seed=0)
    assert r["baselines"]["base+icl2"]["tasks"]["lw"]["accuracy"] == pytest.approx(
        metrics.accuracy(_manual_label_scores(model, tok, task, demos), refs))
    from peft import PeftModel

    tuned = PeftModel.from_pretrained(model, str(adapter)).eval()
    assert r["tasks"]["lw"]["accuracy"] == pytest.approx(metrics.accuracy(_manual_label_scores(tuned, tok, task), refs))


def test_icl_demos_are_balanced_seeded_and_formatted():
    rows = [{"text": f"t{i}", "label": "good" if i % 3 else "very bad"} for i in range(12)]
    train = Task("lw", None, rows, ["good", "very bad"], "Review: {text}\nVerdict:")
    demos = icl_examples(train, 4, seed=5)
    assert demos == icl_examples(train, 4, seed=5)
    assert sorted(d["label"] for d in demos) == ["good", "good", "very bad", "very bad"]
    prompt = with_demos(train, {"text": "new"}, demos[:1])
    assert prompt == f"Review: {demos[0]['text']}\nVerdict: {demos[0]['label']}\n\nReview: new\nVerdict:"


def test_generation_matches_unbatched_greedy(tmp_path):
    from transformers import AutoModelForCausalLM

    from peftmerge.data.prompts import prompt_of

    base = save_llama(tmp_path / "llama", seed=4)
    rows = [{"instruction": "answer the question", "input": "the game", "output": "the team won"},
            {"instruction": "a question", "input": "", "output": "yes"},
            {"instruction": "the story", "input": "a film", "output": "the film was good"}]
    data = write_task(tmp_path / "d", rows)
    s = Settings(progress=False, batch_size=2, max_new_tokens=4)
    r = evaluate(str(base), {"gen": data}, settings=s)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    tok = tokenizer("llama")
    task = load_task("gen", data)
    preds = []
    for row in rows:
        enc = tok(prompt_of(task, row), return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0)
        preds.append(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    refs = [x["output"] for x in rows]
    assert r["tasks"]["gen"] == pytest.approx({"exact_match": metrics.exact_match(preds, refs),
                                               "rougeL": metrics.rouge_l(preds, refs)})


def test_cli_eval_writes_table_and_report(tmp_path):
    from peftmerge.cli.main import main

    base = save_bert(tmp_path / "bert", head=(torch.zeros(2, 32), torch.tensor([0.0, 5.0])))
    data = write_task(tmp_path / "sent", SENTIMENT[:5], labels=["negative", "positive"])
    out = tmp_path / "res" / "results.json"
    runner = CliRunner()
    res = runner.invoke(main, ["eval", "--model", str(base), "--data", f"sent={data}", "-o", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "| base | 0.6000 |" in res.output
    assert json.loads(out.read_text())["tasks"]["sent"]["accuracy"] == pytest.approx(0.6)
    assert out.with_suffix(".md").exists() and out.with_suffix(".png").stat().st_size > 1000
    res = runner.invoke(main, ["eval", "report", str(out), "-o", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert "| base | 0.6000 |" in (tmp_path / "rep" / "report.md").read_text()
    assert (tmp_path / "rep" / "bars.png").exists() and (tmp_path / "rep" / "normalized_vs_tasks.png").exists()
    # an existing output is refused
    res = runner.invoke(main, ["eval", "--model", str(base), "--data", f"sent={data}", "-o", str(out), "--quiet"])
    assert res.exit_code == 2 and "already exists" in res.output


def test_cli_eval_flags_a_cell_below_the_majority_class_rate(tmp_path):
    from peftmerge.cli.main import main

    # classifier weight 0, bias (5, 0): every row is predicted "negative"; 3 of the 5 rows are positive, so the
    # accuracy (0.4) is below always answering "positive" (0.6)
    base = save_bert(tmp_path / "bert", head=(torch.zeros(2, 32), torch.tensor([5.0, 0.0])))
    data = write_task(tmp_path / "sent", SENTIMENT[:5], labels=["negative", "positive"])
    good = write_task(tmp_path / "neg", [r for r in SENTIMENT if r["label"] == "negative"][:3],
                      labels=["negative", "positive"])
    out = tmp_path / "results.json"
    res = CliRunner().invoke(main, ["eval", "--model", str(base), "--data", f"sent={data}", "--data", f"neg={good}",
                                    "-o", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "| base | 0.4000 (!) | 1.0000 |" in res.output
    assert "(!) below the task's majority-class rate (sent 0.6000)" in res.output
    assert json.loads(out.read_text())["data"]["sent"]["majority"] == pytest.approx(0.6)
    assert "0.4000 (!)" in out.with_suffix(".md").read_text()
    res = CliRunner().invoke(main, ["eval", "report", str(out), "-o", str(tmp_path / "rep")])
    assert "0.4000 (!)" in (tmp_path / "rep" / "report.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--data", "sst2"], "is not NAME=PATH"),
    (["--data", "x=missing.jsonl"], "no such data file"),
    (["--data", "x=DATA", "--router", "DATA"], "no router.json; pass a folder written by `peftmerge route build`"),
    (["--data", "x=DATA", "--reference", "y=DATA"], "names task(s) y that have no --data"),
    ([], "no --data"),
])
def test_cli_eval_bad_input_exit_2(tmp_path, args, message):
    from peftmerge.cli.main import main

    base = save_bert(tmp_path / "bert")
    data = write_task(tmp_path / "d", SENTIMENT[:2], labels=["negative", "positive"])
    args = [a.replace("DATA", str(data)) for a in args]
    res = CliRunner().invoke(main, ["eval", "--model", str(base), *args, "--quiet"])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_no_model_same_error_from_cli_and_python(tmp_path):
    from peftmerge.cli.main import main

    data = write_task(tmp_path / "d", SENTIMENT[:2], labels=["negative", "positive"])
    res = CliRunner().invoke(main, ["eval", "--data", f"sent={data}", "--quiet"])
    assert res.exit_code == 2 and "--model is required" in res.output and "Traceback" not in res.output
    with pytest.raises(PeftmergeError, match="^--model is required: the base model folder"):
        evaluate(None, [f"sent={data}"])


def test_cli_report_bad_file_exit_2(tmp_path):
    from peftmerge.cli.main import main

    bad = tmp_path / "x.json"
    bad.write_text("{}")
    res = CliRunner().invoke(main, ["eval", "report", str(bad), "-o", str(tmp_path / "r")])
    assert res.exit_code == 2 and "not a peftmerge results.json" in res.output


def test_normalized_vs_tasks_lines_join_a_systems_k_task_merges_only():
    from peftmerge.evaluate.report import series_name

    names = ["ties", "ties (2 tasks)", "ties (3 tasks)", "ties+grid", "regmean+layerwise", "regmean (1 task)"]
    assert [series_name({"name": n}) for n in names] == ["ties", "ties", "ties", "ties+grid", "regmean+layerwise",
                                                        "regmean"]


def test_data_under_another_name_is_prompted_with_the_adapters_template(tmp_path):
    """Out-of-domain evaluation: the adapter's template (not the default prompt) on the data's own labels; a merge
    of adapters with different templates and no task of that name is refused."""
    from peftmerge.evaluate.runner import task_meta

    base = save_llama(tmp_path / "llama", seed=3)
    data = write_task(tmp_path / "d", LW_ROWS, labels=["good", "very bad"])
    adapter = lora_adapter(base, tmp_path / "lw", task="lw", labels=["good", "very bad"],
                           targets=("q_proj", "v_proj"), template="Review: {text}\nVerdict:")
    own = evaluate(str(base), {"lw": data}, adapter=str(adapter), settings=QUIET)
    other = evaluate(str(base), {"ood": data}, adapter=str(adapter), settings=QUIET)
    assert other["tasks"]["ood"]["accuracy"] == own["tasks"]["lw"]["accuracy"]
    assert task_meta("ood", adapter) == {"template": "Review: {text}\nVerdict:"}
    assert task_meta("ood", tmp_path / "d") == {}  # no adapter metadata: the default prompt

    second = lora_adapter(base, tmp_path / "lw2", task="lw2", labels=["good", "very bad"],
                          targets=("q_proj", "v_proj"), template="Text: {text}\nLabel:")
    merged = tmp_path / "merged"
    merged.mkdir()
    report = {"method": "ties", "inputs": [{"path": str(adapter)}, {"path": str(second)}]}
    (merged / "merge_report.json").write_text(json.dumps(report))
    with pytest.raises(PeftmergeError, match=r"different prompt templates \(tasks lw, lw2\).*--data TASK=FILE"):
        task_meta("ood", merged)
    assert task_meta("lw2", merged)["template"] == "Text: {text}\nLabel:"
