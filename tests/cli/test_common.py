"""What every command shares: --quiet, --debug, --threads, --overwrite, one-line errors, quiet libraries; and
the smaller CLI promises (combine --help shows the defaults, eval fails fast without --model, predictions carry
their query, cards name commands that exist)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import click
import pytest
import torch
from click.testing import CliRunner
from eval_fixtures import SENTIMENT, TOPIC, lora_adapter, save_bert, write_task

from peftmerge.cli.main import main
from peftmerge.errors import PeftmergeError


def commands(group: click.Group = main, prefix=()):
    """(path, command) of every command, subcommands included."""
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            if cmd.callback is not None and cmd.invoke_without_command:
                yield (*prefix, name), cmd
            yield from commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


ALL = dict(commands())


def test_every_command_takes_quiet_debug_threads_and_overwrite_where_it_writes():
    assert {" ".join(p) for p in ALL} == {"combine", "eval", "eval report", "extract", "grams", "inspect", "methods",
                                          "predict", "push", "route build", "route eval", "search", "train",
                                          "train-many"}
    for path, cmd in ALL.items():
        names = {p.name for p in cmd.params}
        assert {"quiet", "debug", "threads"} <= names, (path, names)
        if "out" in names:
            assert "overwrite" in names, path
    assert "debug" in {p.name for p in main.commands["route"].params}  # `peftmerge route --debug build ...`


def test_debug_shows_the_traceback(tmp_path):
    r = CliRunner().invoke(main, ["combine", str(tmp_path / "nope"), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1
    r = CliRunner().invoke(main, ["combine", str(tmp_path / "nope"), "-o", str(tmp_path / "o"), "--debug"])
    assert isinstance(r.exception, PeftmergeError)  # raised, so click/python show the traceback


def test_usage_errors_are_one_line():
    r = CliRunner().invoke(main, ["route", "build", "--top-k", "two", "-o", "x"], prog_name="peftmerge")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert "Invalid value for '--top-k'" in r.stderr and "peftmerge route build --help" in r.stderr


def test_combine_help_lists_every_method_with_its_defaults():
    from peftmerge.merge.registry import methods

    r = CliRunner().invoke(main, ["combine", "--help"])
    assert r.exit_code == 0
    text = " ".join(r.stdout.split())
    for m in methods():
        params = ", ".join(f"{p.name}={p.default}" for p in m.params) or "weights only"
        assert f"{m.name} {params}" in text, m.name


def test_combine_summary_explains_a_large_relative_error():
    from peftmerge.cli.combine import error_hint

    small = error_hint({"relative_error_mean": 1e-7, "relative_error_max": 2e-7, "rank": None})
    assert small == "relative error mean 1.00e-07, max 2.00e-07"
    large = error_hint({"relative_error_mean": 0.355, "relative_error_max": 0.4, "rank": None})
    assert "36% off the full-space merge" in large and "--rank N keeps more" in large and "--space core" in large


def test_eval_without_model_fails_before_loading_anything():
    code = textwrap.dedent("""
        import sys
        from peftmerge.cli.main import main
        try:
            main(["eval", "--data", "x=y.jsonl"], prog_name="peftmerge")
        except SystemExit as e:
            print(e.code, "torch" in sys.modules, "transformers" in sys.modules)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["2", "False", "False"], r.stdout + r.stderr
    assert r.stderr.strip() == "Error: --model is required: the base model folder, .gguf file or Hub id"


def test_threads_option_and_default_rule(monkeypatch):
    from peftmerge import threads

    from peftmerge.merge import registry

    before, seen = torch.get_num_threads(), []
    real = registry.methods
    monkeypatch.setattr(registry, "methods", lambda: seen.append((torch.get_num_threads(),
                                                                  os.environ.get("OMP_NUM_THREADS"))) or real())
    try:
        for n in (1, 3):
            r = CliRunner().invoke(main, ["methods", "--threads", str(n)])
            assert r.exit_code == 0 and seen[-1] == (n, str(n))  # while the command runs
            assert torch.get_num_threads() == before  # and given back after it
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(threads, "cores", lambda: 8)
        for load, want in ((0.0, 8), (2.6, 5), (7.4, 1), (30.0, 1)):
            monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
            assert threads.default_threads() == want
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert threads.default_threads() == 3
        with pytest.raises(PeftmergeError, match="threads 0 must be"):
            threads.set_threads(0)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bert_world(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-common")
    bert = save_bert(d / "bert")
    kw = dict(classify=True, scale=0.5, targets=("query", "value"))
    sent = lora_adapter(bert, d / "sent", seed=1, task="sent", labels=["negative", "positive"], **kw)
    topic = lora_adapter(bert, d / "topic", seed=2, task="topic", labels=["sports", "business", "tech"], **kw)
    sv = write_task(d / "data" / "sent", SENTIMENT, labels=["negative", "positive"], name="validation.jsonl")
    tv = write_task(d / "data" / "topic", TOPIC, labels=["sports", "business", "tech"], name="validation.jsonl")
    return d, bert, sent, topic, sv, tv


def test_quiet_prints_the_result_only_and_predictions_carry_id_and_text(bert_world, tmp_path):
    d, bert, sent, topic, sv, tv = bert_world
    run = CliRunner().invoke
    r = run(main, ["route", "build", str(sent), str(topic), "-o", str(tmp_path / "r"), "--quiet",
                   "--examples", f"sent={sv}", "--examples", f"topic={tv}"])
    assert r.exit_code == 0 and r.stdout == "" and r.stderr == "", r.output
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"id": "q7", "text": "the team won"}) + "\n"
                       + json.dumps({"text": "a good film", "text_pair": "the plot"}) + "\n")
    r = run(main, ["predict", "--router", str(tmp_path / "r"), "--input", str(queries), "-o", str(tmp_path / "p.jsonl"),
                   "--quiet"])
    assert r.exit_code == 0 and r.stdout == "" and r.stderr == "", r.output
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [(row["id"], row["text"]) for row in rows] == [("q7", "the team won"), (1, ["a good film", "the plot"])]
    assert list(rows[0])[:2] == ["id", "text"] and "label" in rows[0]
    r = run(main, ["route", "eval", "--router", str(tmp_path / "r"), "--data", f"sent={sv}", "-o",
                   str(tmp_path / "e.json"), "--quiet"])
    assert r.exit_code == 0 and r.stderr == "" and r.stdout.startswith("sent: ")  # the result, and nothing else
    assert json.loads((tmp_path / "e.json").read_text())["tasks"]["sent"]["n"] == len(SENTIMENT)
    r = run(main, ["route", "eval", "--router", str(tmp_path / "r"), "--data", f"sent={sv}", "-o",
                   str(tmp_path / "e.json")])
    assert r.exit_code == 2 and "--overwrite" in r.stderr  # like every other command


def test_normal_runs_show_no_library_noise(bert_world, tmp_path):
    """One child process (real stderr, not a capture) runs train, combine, eval, route build and a failing eval:
    its stderr holds the one error line and nothing else: no warnings, load reports or progress bars."""
    from train_fixtures import make_llama, sentiment_rows, write_jsonl

    d, bert, sent, topic, sv, tv = bert_world
    llama = make_llama(tmp_path / "llama")
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(8))
    runs = [
        ["train", "--model", llama, "--data", data, "--task", "t", "-o", tmp_path / "t", "--max-steps", "1", "--r", "2",
         "--target-modules", "q_proj", "--batch-size", "4", "--max-length", "32", "--quiet"],
        ["train", "--model", llama, "--data", data, "--task", "t", "-o", tmp_path / "t2", "--max-steps", "1", "--r",
         "2", "--target-modules", "q_proj", "--batch-size", "4", "--max-length", "32"],
        ["combine", sent, topic, "-o", tmp_path / "m", "--method", "ties"],
        ["eval", "--model", bert, "--adapter", tmp_path / "m", "--data", f"sent={sv}", "--data", f"topic={tv}"],
        ["route", "build", sent, topic, "-o", tmp_path / "r", "--examples", f"sent={sv}", "--examples", f"topic={tv}"],
        ["eval", "--model", bert, "--adapter", tmp_path / "t", "--data", f"sent={sv}"],  # a llama adapter on BERT
    ]
    code = textwrap.dedent(f"""
        from peftmerge.cli.main import main
        for args in {[[str(a) for a in r] for r in runs]!r}:
            try:
                main(args, prog_name="peftmerge")
            except SystemExit as e:
                print("exit", e.code, flush=True)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.stdout.count("exit 0") == 5 and "exit 2" in r.stdout, r.stdout + r.stderr
    assert r.stdout.splitlines()[0] == "exit 0"  # train --quiet: not even its summary
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr


def test_cards_name_commands_that_exist():
    from peftmerge.io.card import make_card

    card = make_card(kind="router", base_model="org/base", recipe={"strategy": "centroid"}, repo_id="bob/router")
    usage = card.text.split("```bash")[1].split("```")[0]
    commands_used = [line.split()[1:3] for line in usage.strip().splitlines() if line.startswith("peftmerge ")]
    assert commands_used
    for words in commands_used:
        path = tuple(w for w in words if not w.startswith("-"))[: 2 if words[0] == "route" else 1]
        assert path in ALL, path


def test_inputs_table_has_the_weights_and_a_trained_adapters_recipe_survives(tmp_path):
    from peftmerge.io.card import make_card
    from peftmerge.hub.push import card_from_folder

    card = make_card(kind="merged-adapter", base_model="org/base",
                     recipe={"method": "ties", "weights": [0.3, 0.7],
                             "inputs": [{"path": "a", "sha256": "1" * 64}, {"path": "b", "sha256": "2" * 64}]})
    assert "| `a` | 0.3 | sha256" in card.text and "| `b` | 0.7 | sha256" in card.text
    folder = tmp_path / "trained"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM",
                                                             "base_model_name_or_path": "org/base"}))
    (folder / "peftmerge.json").write_text(json.dumps({"task": "sst2", "method": "lora",
                                                        "config": {"r": 8, "lr": 0.0002, "epochs": 1.0}}))
    recipe = json.loads(str(card_from_folder(folder)).split("```json")[1].split("```")[0])
    assert recipe["r"] == 8 and recipe["lr"] == 0.0002 and recipe["task"] == "sst2" and recipe["method"] == "lora"


def test_jsonl_lines_split_on_newline_only(tmp_path):
    from peftmerge.data.tasks import load_task
    from peftmerge.train.data import read_rows

    texts = ["line\u2028separator", "para\u2029graph", "next\u0085line", "form\x0cfeed", "vertical\x0btab"]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": "a" if i % 2 else "b"}, ensure_ascii=False) + "\n"
                            for i, t in enumerate(texts)), encoding="utf-8")
    assert [r["text"] for r in read_rows(path)] == texts
    assert [r["text"] for r in load_task("t", path).rows] == texts
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes(b'{"text": "a", "label": "x"}\r\n{"text": "b", "label": "y"}\r\n')
    assert [r["text"] for r in read_rows(crlf)] == ["a", "b"] and len(load_task("t", crlf).rows) == 2
