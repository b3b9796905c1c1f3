"""Reading rows, recognising formats, completion-only masking, truncation, packing and padding."""

from __future__ import annotations

import json

import pytest
import torch

from train_fixtures import make_tokenizer, sentiment_rows, write_jsonl

from peftmerge.errors import PeftmergeError
from peftmerge.train import TrainConfig
from peftmerge.train.data import ALPACA_PROMPT, load_task, prompt_and_completion, read_rows, row_format
from peftmerge.train.examples import IGNORE, Collator, fit, pack, text2text_example


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("causal")


ROWS = [{"text": "good film", "label": "positive"}, {"text": "bad plot", "label": "negative"}]


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet", "datasets"])
def test_read_rows_every_format(suffix, tmp_path):
    import pandas as pd

    path = tmp_path / f"rows.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, ROWS)
    elif suffix == "json":
        path.write_text(json.dumps(ROWS))
    elif suffix == "csv":
        pd.DataFrame(ROWS).to_csv(path, index=False)
    elif suffix == "parquet":
        pd.DataFrame(ROWS).to_parquet(path)
    else:
        import datasets

        datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(path))
    assert read_rows(path) == ROWS


def test_task_folder_uses_validation_and_task_json_labels(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(10))
    write_jsonl(tmp_path / "validation.jsonl", sentiment_rows(4, seed=9))
    (tmp_path / "task.json").write_text(json.dumps({"labels": ["positive", "negative", "neutral"]}))
    task = load_task(TrainConfig(model="m", data=str(tmp_path), task="t", out="o"))
    assert task.format == "labelled" and len(task.train) == 10 and task.validation == sentiment_rows(4, seed=9)
    assert task.labels == ["positive", "negative", "neutral"]  # task.json order, not sorted


def test_val_fraction_and_max_samples_split_without_overlap(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(40)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    task = load_task(TrainConfig(model="m", data=str(tmp_path / "d.jsonl"), task="t", out="o", val_fraction=0.25,
                                 max_samples=20))
    assert len(task.train) == 15 and len(task.validation) == 5 and task.labels is None
    seen = [r["prompt"] for r in task.train + task.validation]
    assert len(set(seen)) == 20 and set(seen) <= {r["prompt"] for r in rows}


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "no rows; the file is empty"),
        ('{"text": "a", "label": "x"}\n{"text": "b"}\n', "row 2: missing field 'label'"),
        ('{"foo": 1}\n', "row 1: fields \\['foo'\\] match no format"),
        ('{"text": "a", "label": "x"}\nnot json\n', "line 2: not valid JSON"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "must be a list ending with an assistant message"),
    ],
)
def test_bad_data_one_line_errors(content, message, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(PeftmergeError, match=message) as e:
        row_format(read_rows(path), str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_missing_file_and_unknown_labels(tmp_path):
    with pytest.raises(PeftmergeError, match="nope.jsonl: no such file or folder"):
        read_rows(tmp_path / "nope.jsonl")
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(PeftmergeError, match="label\\(s\\) positive not in the label set"):
        load_task(TrainConfig(model="m", data=str(tmp_path / "d.jsonl"), task="t", out="o", labels=["negative", "x"]))


def _check_mask(ex, n_prompt):
    ids, labels = ex["input_ids"], ex["labels"]
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and all(x != IGNORE for x in labels[n_prompt:])


@pytest.mark.parametrize("fmt, row", [
    ("alpaca", {"instruction": "say hello", "input": "tiny world", "output": "hello world"}),
    ("alpaca", {"instruction": "say hello", "output": "hello world"}),
    ("prompt", {"prompt": "repeat the movie", "completion": "the movie"}),
    ("labelled", {"text": "the movie was good", "label": "positive"}),
])
def test_completion_only_mask_covers_exactly_the_prompt(fmt, row, tok):
    prompt, completion = prompt_and_completion(row, fmt, None, "sst", ["negative", "positive"])
    n_prompt = len(tok(prompt)["input_ids"])
    ex = text2text_example(row, fmt, tok, 512, template=None, task="sst", labels=["negative", "positive"])
    _check_mask(ex, n_prompt)
    assert ex["input_ids"][:n_prompt] == tok(prompt)["input_ids"]
    assert ex["input_ids"][n_prompt:] == tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    if fmt == "alpaca" and "input" in row:
        assert prompt == ALPACA_PROMPT.format(**row)
    everything = text2text_example(row, fmt, tok, 512, train_on_inputs=True, task="sst", labels=["negative", "positive"])
    assert everything["labels"] == everything["input_ids"]


@pytest.mark.parametrize("row", [{"instruction": "name a {colour}", "output": "red"},
                                 {"instruction": "translate", "input": "chat", "output": "cat"}])
def test_train_and_eval_give_an_instruction_row_one_alpaca_prompt(row, tmp_path):
    from peftmerge.data.prompts import prompt_of
    from peftmerge.data.tasks import load_task as load_eval_task

    write_jsonl(tmp_path / "test.jsonl", [row])
    prompt, completion = prompt_and_completion(row, "alpaca")
    assert prompt == prompt_of(load_eval_task("t", tmp_path / "test.jsonl"), row)
    assert prompt.startswith("Below is an instruction") and prompt.endswith("### Response:\n")
    assert ("### Input:\nchat\n\n" in prompt) == ("input" in row) and completion == row["output"]


def test_chat_mask_is_the_generation_prompt(tok):
    msgs = [{"role": "user", "content": "say hello"}, {"role": "assistant", "content": "hello world"}]
    ex = text2text_example({"messages": msgs}, "chat", tok, 512)
    head = tok(tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    n = len(head["input_ids"])
    _check_mask(ex, n)
    assert tok.decode(ex["input_ids"][n:]) == "hello world </s>"


def test_fit_keeps_completion_and_both_ends_of_the_prompt():
    p, c = fit(list(range(100)), [900, 901, 902], 20)
    assert c == [900, 901, 902] and len(p) + len(c) == 20
    assert p[:8] == list(range(8)) and p[-9:] == list(range(91, 100))
    p, c = fit([1, 2], list(range(50)), 10)
    assert len(p) + len(c) == 10 and c == list(range(8))


def test_pack_and_collator_padding():
    exs = [{"input_ids": [1] * n, "attention_mask": [1] * n, "labels": [IGNORE] + [1] * (n - 1)} for n in (3, 4, 5, 6)]
    packed = pack(exs, 8)
    assert [len(p["input_ids"]) for p in packed] == [7, 5, 6]
    assert packed[0]["labels"] == [IGNORE, 1, 1, IGNORE, 1, 1, 1]
    batch = Collator(pad_id=0)(exs[:2])
    assert batch["input_ids"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["labels"][0].tolist() == [IGNORE, 1, 1, IGNORE]
    assert batch["attention_mask"].sum().item() == 7
    left = Collator(pad_id=0, left=True)([{"input_ids": [5], "attention_mask": [1], "labels": 1},
                                          {"input_ids": [6, 7], "attention_mask": [1, 1], "labels": 0}])
    assert left["input_ids"].tolist() == [[0, 5], [6, 7]] and torch.equal(left["labels"], torch.tensor([1, 0]))


@pytest.mark.parametrize("row", [{"text": "a fine film", "label": "positive"},
                                 {"text": "a fine film", "text_pair": "it was good", "label": "positive"}])
def test_train_and_eval_give_a_labelled_row_one_label_word_prompt(row, tmp_path):
    """A base model's zero-shot row is prompted as `peftmerge train` prompts its adapters (one label template)."""
    from peftmerge.data.prompts import prompt_of
    from peftmerge.data.tasks import load_task as load_eval_task

    (tmp_path / "task.json").write_text('{"labels": ["negative", "positive"]}')
    write_jsonl(tmp_path / "test.jsonl", [row])
    from peftmerge.train.data import default_template

    prompt, completion = prompt_and_completion(row, "labelled", default_template([row]), task="t",
                                               labels=["negative", "positive"])  # as train() calls it
    assert prompt == prompt_of(load_eval_task("t", tmp_path / "test.jsonl"), row)
    assert prompt.startswith("Task: t. Answer with one of: negative, positive.") and completion.strip() == "positive"
