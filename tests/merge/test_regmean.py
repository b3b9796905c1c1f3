"""RegMean: the closed form against a least-squares solve, factor space against dense, ``grams`` against
PEFT's own forward pass, and the CLI round trip with its errors."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from eval_fixtures import SENTIMENT, TOPIC, lora_adapter, write_task
from peftmerge.cli.main import main
from peftmerge.merge import execute, registry
from peftmerge.merge.methods.regmean import regmean_factored

RM = registry.get("regmean")


def _problem(n=3, d_out=5, d_in=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(20 + 7 * i, d_in, generator=g, dtype=torch.float64) for i in range(n)]
    deltas = torch.randn(n, d_out, d_in, generator=g, dtype=torch.float64)
    grams = [x.T @ x / x.shape[0] for x in xs]  # what `peftmerge grams` stores: the mean over tokens
    return xs, deltas, grams


def _merge(deltas, weights, grams, off_diagonal=1.0):
    ctx = registry.Context("m", grams=grams)
    params = RM.resolve({"off_diagonal": off_diagonal}, len(weights))
    return execute.dense(RM, deltas, torch.tensor(weights, dtype=torch.float64), params, ctx)


def test_regmean_is_the_least_squares_fit_of_every_inputs_outputs():
    """Eq. 1: argmin_W sum_i |X_i W^T - w_i X_i dW_i^T|^2 / t_i, solved directly by lstsq on stacked rows."""
    xs, deltas, grams = _problem()
    weights = [1.0, 0.5, 2.0]
    rows = torch.cat([x / x.shape[0] ** 0.5 for x in xs])
    targets = torch.cat([w * x @ d.T / x.shape[0] ** 0.5 for x, d, w in zip(xs, deltas, weights)])
    reference = torch.linalg.lstsq(rows, targets).solution.T
    torch.testing.assert_close(_merge(deltas, weights, grams), reference, rtol=1e-6, atol=1e-8)


def test_off_diagonal_zero_weighs_each_input_feature_by_its_diagonal():
    xs, deltas, grams = _problem(seed=1)
    diag = torch.stack([torch.diagonal(g) for g in grams])  # (n, d_in)
    reference = (deltas * diag[:, None, :]).sum(0) / diag.sum(0)
    torch.testing.assert_close(_merge(deltas, [1.0] * 3, grams, 0.0), reference)


def test_invariants_one_input_identical_inputs_and_order():
    xs, deltas, grams = _problem(seed=2)
    torch.testing.assert_close(_merge(deltas[:1], [1.0], grams[:1]), deltas[0])
    same = deltas[:1].repeat(3, 1, 1)
    torch.testing.assert_close(_merge(same, [1.0] * 3, grams), deltas[0])
    perm = [2, 0, 1]
    torch.testing.assert_close(_merge(deltas[perm], [1.0] * 3, [grams[i] for i in perm]),
                               _merge(deltas, [1.0] * 3, grams))


def test_factor_space_equals_dense_and_an_absent_input_still_counts():
    g = torch.Generator().manual_seed(3)
    _, _, grams = _problem(seed=3)
    factors = [(torch.randn(5, 2, generator=g), torch.randn(2, 7, generator=g)), None,
               (torch.randn(5, 4, generator=g), torch.randn(4, 7, generator=g))]
    dense = torch.stack([(b @ a).double() if (b, a) != (None, None) else torch.zeros(5, 7, dtype=torch.float64)
                         for b, a in [f or (None, None) for f in factors]])
    params = RM.resolve({"off_diagonal": 0.8}, 3)
    b, a = regmean_factored(factors, 3, (5, 7), params, registry.Context("m", grams=[x.float() for x in grams]))
    assert b.shape[1] == 6  # the present inputs' ranks, nothing for the absent one
    expected = _merge(dense, [1.0] * 3, grams, 0.8)
    torch.testing.assert_close((b @ a).double(), expected, rtol=1e-4, atol=1e-5)
    # the absent input's Gram matters: dropping it changes the merge
    assert not torch.allclose(expected, _merge(dense[[0, 2]], [1.0] * 2, [grams[0], grams[2]], 0.8))


def test_a_tensor_without_grams_is_the_weighted_mean():
    _, deltas, _ = _problem(seed=4)
    torch.testing.assert_close(_merge(deltas, [1.0, 2.0, 3.0], None),
                               (deltas * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)[:, None, None]).mean(0))


# --- grams and the CLI on tiny BERT classifiers ---------------------------------------------------------------

def _peft_gram(base, adapter, rows, module):
    """x x^T / tokens of ``module``'s input inside PEFT's own model with the adapter, padding excluded."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    meta = json.loads((adapter / "peftmerge.json").read_text())
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(meta["labels"]))
    model = PeftModel.from_pretrained(model, adapter).eval()
    tok = AutoTokenizer.from_pretrained(base)
    enc = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
    seen = []
    layer = model.get_submodule(f"base_model.model.{module}")
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(**enc)
    handle.remove()
    x = seen[0][enc["attention_mask"].bool()].double()
    return x.T @ x / x.shape[0]


def test_grams_are_each_adapters_layer_inputs_on_its_own_rows(bert_pair, tmp_path):
    from safetensors import safe_open

    from peftmerge.analysis.grams import grams

    base, inputs, data = bert_pair
    out = tmp_path / "g.safetensors"
    report = grams(inputs, out, data=data, model=str(base), progress=False)
    assert report["tasks"] == ["sent", "topic"] and report["tokens"]["sent"] > 0
    module = "bert.encoder.layer.1.attention.self.query"  # layer 1: its input depends on layer 0's adapter
    with safe_open(str(out), "pt") as f:
        for adapter, task, rows in [(inputs[0], "sent", SENTIMENT), (inputs[1], "topic", TOPIC)]:
            torch.testing.assert_close(f.get_tensor(f"{task}/{module}").double(),
                                       _peft_gram(base, adapter, rows, module), rtol=1e-4, atol=1e-5)


def test_cli_grams_then_combine_regmean_writes_the_closed_form(bert_pair, tmp_path):
    from peftmerge.io.grams import Grams
    from peftmerge.io.adapter import load_adapter

    base, inputs, data = bert_pair
    runner = CliRunner()
    g = tmp_path / "g.safetensors"
    r = runner.invoke(main, ["grams", *map(str, inputs), "--model", str(base), "--quiet", "-o", str(g),
                             *[x for t, p in data.items() for x in ("--data", f"{t}={p}")]])
    assert r.exit_code == 0, r.output
    out = tmp_path / "merged"
    r = runner.invoke(main, ["combine", *map(str, inputs), "--method", "regmean", "--grams", str(g),
                             "--off-diagonal", "0.9", "-o", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    merged, ins = load_adapter(out), [load_adapter(p) for p in inputs]
    gf = Grams(g)
    for module in ins[0].modules:
        deltas = torch.stack([a.delta(module).double() for a in ins])
        expected = _merge(deltas, [1.0, 1.0], [x.double() for x in gf.of(module, ["sent", "topic"])], 0.9)
        torch.testing.assert_close(merged.delta(module).double(), expected, rtol=1e-4, atol=1e-6)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["params"] == {"off_diagonal": 0.9, "space": "full"} and report["grams"]["path"] == str(g)
    assert sorted(p.stem for p in (out / "heads").iterdir()) == ["sent", "topic"]  # every input's head kept


def test_regmean_errors_name_the_fix(bert_pair, tmp_path):
    base, inputs, data = bert_pair
    runner = CliRunner()
    g = tmp_path / "g.safetensors"

    def run(*args):
        return runner.invoke(main, [*map(str, args)])

    r = run("combine", *inputs, "--method", "regmean", "-o", tmp_path / "m")
    assert r.exit_code == 2 and "peftmerge grams" in r.output and "--grams" in r.output
    test_file = write_task(tmp_path / "t", SENTIMENT, name="test.jsonl")
    r = run("grams", *inputs, "--data", f"sent={test_file}", "--data", f"topic={data['topic']}", "-o", g)
    assert r.exit_code == 2 and "test" in r.output
    r = run("grams", *inputs, "--data", f"sent={data['sent']}", "-o", g)
    assert r.exit_code == 2 and "topic" in r.output and not g.exists()
    assert run("grams", *inputs, "--model", base, "--quiet", "-o", g,
               *[x for t, p in data.items() for x in ("--data", f"{t}={p}")]).exit_code == 0
    r = run("combine", *inputs, "--method", "ties", "--grams", g, "-o", tmp_path / "m")
    assert r.exit_code == 2 and "regmean" in r.output
    r = run("combine", *inputs, "--method", "regmean", "--grams", g, "--base", base, "-o", tmp_path / "m")
    assert r.exit_code == 2 and "LoRA adapters only" in r.output
    r = run("combine", *inputs, "--method", "regmean", "--grams", inputs[0] / "adapter_model.safetensors", "-o",
            tmp_path / "m")
    assert r.exit_code == 2 and "not a peftmerge grams file" in r.output and "Traceback" not in r.output
    other = lora_adapter(base, tmp_path / "sent2", seed=9, task="sent", labels=["negative", "positive"],
                         classify=True, targets=("query", "value", "dense"))
    r = run("combine", other, inputs[1], "--method", "regmean", "--grams", g, "-o", tmp_path / "m")
    assert r.exit_code == 2 and "another adapter" in r.output
    assert not (tmp_path / "m").exists()


def test_layerwise_regmean_starts_at_regmean_and_writes_the_learned_shares(bert_pair, tmp_path):
    from peftmerge.evaluate import Settings, evaluate
    from peftmerge.analysis.grams import grams
    from peftmerge.io.grams import Grams
    from peftmerge.io.adapter import load_adapter
    from peftmerge.search import search

    base, inputs, data = bert_pair
    g = tmp_path / "g.safetensors"
    grams(inputs, g, data=data, model=str(base), progress=False)
    r = search(inputs, tmp_path / "best", "regmean", data=data, model=str(base), strategy="layerwise", grams=g,
               off_diagonal=0.9, epochs=3, lr=0.2, batch_size=4, max_length=32, progress=False)
    start = r["trace"][0]
    assert start["coefficients"] == [[1.0] * len(r["groups"])] * 2  # epoch 0 is RegMean itself
    combine_dir = tmp_path / "plain"
    from peftmerge.merge.combine import combine

    combine(inputs, combine_dir, "regmean", grams=g, off_diagonal=0.9, progress=False)
    quiet = Settings(progress=False, max_length=32)
    plain = evaluate(str(base), data, adapter=str(combine_dir), settings=quiet)
    for t in data:  # the search's start scores what `combine --method regmean` writes
        assert plain["tasks"][t]["accuracy"] == pytest.approx(start["tasks"][t])
    merged, ins, gf = load_adapter(tmp_path / "best"), [load_adapter(p) for p in inputs], Grams(g)
    report = json.loads((tmp_path / "best" / "merge_report.json").read_text())
    assert report["method"] == "regmean" and report["params"] == {"off_diagonal": 0.9, "space": "full"}
    for module, weights in report["module_weights"].items():  # sum_i c_i,module dW_i T_i
        deltas = torch.stack([a.delta(module).double() for a in ins])
        expected = _merge(deltas, weights, [x.double() for x in gf.of(module, ["sent", "topic"])], 0.9)
        torch.testing.assert_close(merged.delta(module).double(), expected, rtol=1e-4, atol=1e-6)
    got = evaluate(str(base), data, adapter=str(tmp_path / "best"), settings=quiet)
    for t in data:  # and the written adapter scores what the search recorded for it
        assert got["tasks"][t]["accuracy"] == pytest.approx(r["best"]["tasks"][t])


def test_grid_search_over_off_diagonal_writes_the_best_point(bert_pair, tmp_path):
    from peftmerge.analysis.grams import grams
    from peftmerge.search import search

    base, inputs, data = bert_pair
    g = tmp_path / "g.safetensors"
    grams(inputs, g, data=data, model=str(base), progress=False)
    r = search(inputs, tmp_path / "best", "regmean", data=data, model=str(base), grams=g,
               grid={"off_diagonal": [0.0, 1.0]}, batch_size=4, max_length=32, progress=False)
    assert [row["params"]["off_diagonal"] for row in r["trace"]] == [0.0, 1.0]
    report = json.loads((tmp_path / "best" / "merge_report.json").read_text())
    assert report["params"] == {**r["best"]["params"], "space": "full"} and report["grams"]["path"] == str(g)


def test_grams_of_a_label_word_adapter_cover_prompt_and_answer_tokens(tmp_path):
    """Causal LM adapters: x x^T over each row's prompt + gold label word, unpadded, one row at a time through
    PEFT's own model (rows of different lengths, so padding would show)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from eval_fixtures import save_llama, tokenizer
    from peftmerge.data.tasks import load_task
    from peftmerge.data.prompts import answer_of, prompt_of
    from peftmerge.analysis.grams import grams
    from peftmerge.io.grams import Grams

    base = save_llama(tmp_path / "llama", seed=3)
    a = lora_adapter(base, tmp_path / "a", seed=4, task="lw", labels=["good", "bad"], targets=("q_proj", "v_proj"),
                     scale=0.5)
    rows = [{"text": "the movie was good", "label": "good"}, {"text": "a dull film very bad plot", "label": "bad"}]
    path = write_task(tmp_path / "lw", rows, labels=["good", "bad"], name="validation.jsonl")
    grams([a], tmp_path / "g.safetensors", data={"lw": path}, model=str(base), progress=False)
    module = "model.layers.1.self_attn.q_proj"
    got = Grams(tmp_path / "g.safetensors").of(module, ["lw"])[0].double()
    task = load_task("lw", path, meta=json.loads((a / "peftmerge.json").read_text()))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), a).eval()
    seen = []
    model.get_submodule(f"base_model.model.{module}").register_forward_pre_hook(
        lambda m, args: seen.append(args[0][0].detach().double()))
    tok = tokenizer("llama")
    with torch.no_grad():
        for row in rows:
            prompt = prompt_of(task, row)
            ids = tok(prompt)["input_ids"] + tok(answer_of(prompt, row["label"]), add_special_tokens=False)["input_ids"]
            model(input_ids=torch.tensor([ids]))
    x = torch.cat(seen)
    torch.testing.assert_close(got, x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)
