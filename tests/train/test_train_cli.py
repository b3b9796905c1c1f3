"""``peftmerge train`` / ``train-many`` from the command line: outputs, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import re

import pytest
from click.testing import CliRunner

from train_fixtures import make_bert, sentiment_rows, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peftmerge.cli.main import main  # noqa: E402


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_train_writes_adapter_metadata_and_card(llama, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(8))
    val = write_jsonl(tmp_path / "val.jsonl", sentiment_rows(4, seed=5))
    r = _run("train", "--model", llama, "--data", data, "--validation", val, "--task", "sst2", "-o", tmp_path / "a",
             "--method", "lora", "--r", 4, "--alpha", 8, "--target-modules", "q_proj,v_proj", "--max-steps", 2,
             "--batch-size", 4, "--max-length", 64, "--lr", "1e-3", "--eval-steps", 2)
    assert r.exit_code == 0, r.output
    assert "sst2: wrote" in r.output and "eval_accuracy=" in r.output
    out = tmp_path / "a"
    assert {"adapter_config.json", "adapter_model.safetensors", "peftmerge.json", "README.md"} <= {p.name for p in out.iterdir()}
    meta = json.loads((out / "peftmerge.json").read_text())
    assert meta["base_model"] == str(llama) and meta["task"] == "sst2" and meta["shape"] == "text2text"
    assert "{text}" in meta["template"] and meta["config"]["r"] == 4
    assert 0.0 <= meta["metrics"]["eval_accuracy"] <= 1.0 and meta["metrics"]["train_steps"] == 2
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8 and set(adapter["target_modules"]) == {"q_proj", "v_proj"}
    card = (out / "README.md").read_text()
    assert f"`{llama}`" in card and "base_model" not in card.split("---")[1] and "library_name: peft" in card
    again = _run("train", "--model", llama, "--data", data, "--task", "sst2", "-o", out, "--max-steps", 1)
    assert again.exit_code == 2 and "already exists; pass --overwrite" in again.output


def test_train_many_trains_each_task(llama, tmp_path):
    bert = make_bert(tmp_path / "bert")
    write_jsonl(tmp_path / "sst.jsonl", sentiment_rows(8))
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "say hello"},
                                                        {"role": "assistant", "content": "hello world"}]}] * 4)
    (tmp_path / "tasks.yaml").write_text(
        f"defaults: {{max_steps: 1, batch_size: 4, r: 4, eval_steps: 100}}\n"
        f"output_dir: {tmp_path / 'adapters'}\n"
        "tasks:\n"
        f"  - {{task: sst, data: sst.jsonl, model: {bert}}}\n"
        f"  - {{task: chat, data: chat.jsonl, model: {llama}, method: dora}}\n"
    )
    r = _run("train-many", tmp_path / "tasks.yaml")
    assert r.exit_code == 0, r.output
    sst = json.loads((tmp_path / "adapters" / "sst" / "peftmerge.json").read_text())
    chat = json.loads((tmp_path / "adapters" / "chat" / "peftmerge.json").read_text())
    assert sst["shape"] == "classify" and sst["labels"] == ["negative", "positive"]
    assert chat["shape"] == "text2text" and chat["format"] == "chat" and chat["samples"] == ["say hello"] * 4
    assert chat["method"] == "dora" and chat["labels"] is None


@pytest.mark.parametrize("content, args, message", [
    ('{"text": "good", "label": "positive"}\n{"text": "bad"}\n', [], "row 2: missing field 'label'"),
    ("", [], "no rows; the file is empty"),
    (None, [], "no such file or folder"),
    ('{"text": "good", "label": "positive"}\n', ["--method", "lorax"], "unknown method 'lorax'; choose one of"),
    ('{"text": "good", "label": "positive"}\n{"text": "bad", "label": "negative"}\n',
     ["--method", "llama_adapter", "--shape", "classify"], "trains causal LMs only"),
    ('{"text": "good", "label": "positive"}\n{"text": "bad", "label": "negative"}\n',
     ["--template", "{txt}"], "bad placeholder"),
])
def test_cli_errors_exit_2_with_one_line(content, args, message, llama, tmp_path):
    data = tmp_path / "d.jsonl"
    if content is not None:
        data.write_text(content)
    r = _run("train", "--model", llama, "--data", data, "--task", "t", "-o", tmp_path / "out", "--max-steps", 1, *args)
    assert r.exit_code == 2, r.output
    assert message in r.output and r.output.startswith("Error: ") and r.output.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["[1]", "{deepspeed", "3"])
def test_training_args_not_a_json_object_same_error_from_cli_and_python(value, llama, tmp_path):
    from peftmerge.errors import PeftmergeError
    from peftmerge.train import TrainConfig, train

    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(2))
    r = _run("train", "--model", llama, "--data", data, "--task", "t", "-o", tmp_path / "out", "--training-args", value)
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    message = f"--training-args {value!r} is not a JSON object"
    assert message in r.output
    with pytest.raises(PeftmergeError, match="^" + re.escape(message)):
        train(TrainConfig(model=str(llama), data=str(data), task="t", out=str(tmp_path / "out"), extra=value))
    assert not (tmp_path / "out").exists()


def test_cli_missing_option_and_bad_yaml(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", sentiment_rows(2))
    r = _run("train", "--model", tmp_path / "no-model", "--data", tmp_path / "d.jsonl", "--task", "t", "-o", tmp_path / "o")
    assert r.exit_code == 2 and "no-model: no such folder" in r.output and r.output.count("\n") == 1
    r = _run("train", "--data", "x.jsonl", "--task", "t", "-o", tmp_path / "o")
    assert r.exit_code == 2 and "Missing option '--model'" in r.output
    (tmp_path / "t.yaml").write_text("tasks:\n  - {task: a, data: a.jsonl, model: m, out: o, learning_rate: 1}\n")
    r = _run("train-many", tmp_path / "t.yaml")
    assert r.exit_code == 2 and "unknown key(s) learning_rate; valid keys:" in r.output and r.output.count("\n") == 1
    (tmp_path / "t.yaml").write_text("tasks:\n  - {task: a, model: m, out: o}\n")
    r = _run("train-many", tmp_path / "t.yaml")
    assert r.exit_code == 2 and "missing 'data'" in r.output
