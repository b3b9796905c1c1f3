"""Read training rows (JSONL / JSON / CSV / Parquet / ``datasets`` folders) and recognise their format.

Row formats (the first row decides; every row must then have the fields):

- ``messages``: chat, a list of ``{"role", "content"}`` ending with the assistant turn to learn;
- ``instruction`` / ``output`` (+ optional ``input``): Alpaca (Taori et al. 2023) instruction rows;
- ``prompt`` / ``completion``;
- ``text`` (+ optional ``text_pair``) / ``label``: labelled rows, for a classification head or, in
  text2text, a prompt from a task template with the label word as the completion.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..data.prompts import ALPACA_TEMPLATE as ALPACA_PROMPT, LABEL_TEMPLATE, alpaca_prompt, label_template  # noqa: F401
from ..errors import PeftmergeError

FORMATS = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt": ("prompt", "completion"),
    "labelled": ("text", "label"),
}
TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class TaskData:
    """Rows of one task: training and validation rows, their format, and the label set (labelled rows)."""

    train: list[dict]
    validation: list[dict]
    format: str
    labels: list[str] | None
    source: str


def read_rows(path: str | Path) -> list[dict]:
    """All rows of one file or ``datasets`` folder, as dicts; one-line errors for missing/empty/bad files."""
    path = Path(path)
    if not path.exists():
        raise PeftmergeError(f"data {path}: no such file or folder; check the path")
    if path.is_dir():
        rows = _read_datasets_folder(path)
    elif path.suffix == ".jsonl" or path.suffix == ".json":
        rows = _read_json(path)
    elif path.suffix == ".csv":
        import pandas as pd

        rows = _frame_rows(pd.read_csv, path)
    elif path.suffix == ".parquet":
        import pandas as pd

        rows = _frame_rows(pd.read_parquet, path)
    else:
        raise PeftmergeError(f"data {path}: unknown file type {path.suffix!r}; use one of {', '.join(TABLE_SUFFIXES)}")
    if not rows:
        raise PeftmergeError(f"data {path}: no rows; the file is empty")
    return rows


def _frame_rows(reader, path: Path) -> list[dict]:
    try:
        frame = reader(path)
    except Exception as e:  # pandas raises many types (EmptyDataError, ArrowInvalid, ...)
        if "No columns" in str(e):
            return []
        raise PeftmergeError(f"data {path}: cannot read it ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return frame.where(frame.notna(), None).to_dict("records")


def _read_json(path: Path) -> list[dict]:
    from ..io.meta import jsonl_lines

    try:
        with open(path, encoding="utf-8") as f:
            is_array = path.suffix == ".json" and f.read(4096).lstrip().startswith("[")
    except UnicodeDecodeError:
        raise PeftmergeError(f"data {path}: not UTF-8 text (a binary file?); give a JSON/JSONL data file") from None
    if is_array:
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise PeftmergeError(f"data {path}: not UTF-8 text (a binary file?); give a JSON data file") from None
        except json.JSONDecodeError as e:
            raise PeftmergeError(f"data {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    else:
        rows = []
        for n, line in jsonl_lines(path):  # split on "\n" only: U+2028 and the like may sit inside strings
            try:
                rows.append(json.loads(line))
            except (json.JSONDecodeError, RecursionError):
                raise PeftmergeError(f"data {path} line {n}: not valid JSON; write one JSON object per line") from None
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise PeftmergeError(f"data {path} row {n}: not a JSON object; write one object per row")
    return rows


def _read_datasets_folder(path: Path) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise PeftmergeError(
            f"data {path}: a folder that is neither a datasets folder (save_to_disk) nor a task folder with "
            "train.jsonl; pass a data file"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise PeftmergeError(f"data {path}: datasets folder without a 'train' split (has {', '.join(ds)})")
        ds = ds["train"]
    return ds.to_list()


def _find_split(folder: Path, split: str) -> Path | None:
    for suffix in TABLE_SUFFIXES:
        p = folder / f"{split}{suffix}"
        if p.exists():
            return p
    return None


def row_format(rows: list[dict], where: str) -> str:
    """Which of :data:`FORMATS` the rows are in; every row must carry that format's fields."""
    first = rows[0]
    fmt = next((name for name, keys in FORMATS.items() if all(k in first for k in keys)), None)
    if fmt is None:
        wanted = "; ".join("+".join(keys) for keys in FORMATS.values())
        raise PeftmergeError(f"data {where} row 1: fields {sorted(first)} match no format; rows need {wanted}")
    for n, row in enumerate(rows, 1):
        for k in FORMATS[fmt]:
            if row.get(k) is None:
                raise PeftmergeError(f"data {where} row {n}: missing field {k!r} (the first row has {fmt} format)")
        if fmt == "chat":
            msgs = row["messages"]
            if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict) or msgs[-1].get("role") != "assistant":
                raise PeftmergeError(f"data {where} row {n}: 'messages' must be a list ending with an assistant message")
    return fmt


def load_task(config) -> TaskData:
    """Training and validation rows for ``config`` (a :class:`TrainConfig`), subsampled and split."""
    data = Path(config.data)
    validation = Path(config.validation) if config.validation else None
    labels = list(config.labels) if config.labels else None
    folder = data if data.is_dir() and _find_split(data, "train") else None
    if folder is not None:  # a task folder: train.jsonl (+ validation.jsonl, task.json)
        data = _find_split(folder, "train")
        if validation is None:
            validation = _find_split(folder, "validation")
    info = data.parent / "task.json" if data.exists() and data.is_file() else None
    if labels is None and info is not None and info.exists():
        try:
            labels = json.loads(info.read_text(encoding="utf-8")).get("labels")
        except (ValueError, AttributeError):  # ValueError: bad JSON, or bytes that are not UTF-8
            raise PeftmergeError(f"{info}: not a valid task.json; fix it or pass --labels") from None
        if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, (str, int)) for x in labels)):
            raise PeftmergeError(f"{info}: 'labels' is not a list of label names; fix it or pass --labels")
    train = read_rows(data)
    rng = random.Random(config.seed)
    if config.max_samples and len(train) > config.max_samples:
        train = rng.sample(train, config.max_samples)
    fmt = row_format(train, str(data))
    if validation is not None:
        val = read_rows(validation)
        if row_format(val, str(validation)) != fmt:
            raise PeftmergeError(f"data {validation}: rows are not in the {fmt} format of {data}; use matching files")
    elif config.val_fraction > 0:
        train = train[:]
        rng.shuffle(train)
        n_val = max(1, int(round(len(train) * config.val_fraction)))
        if n_val >= len(train):
            raise PeftmergeError(f"data {data}: {len(train)} rows are too few to hold out {config.val_fraction:.0%}")
        val, train = train[:n_val], train[n_val:]
    else:
        val = []
    val = sample_rows(val, config.max_eval_samples, config.seed)
    if fmt == "labelled":
        labels = _check_labels(train + val, labels, str(data))
    return TaskData(train=train, validation=val, format=fmt, labels=labels, source=str(data))


def default_task_name(data: str | Path) -> str:
    """The task name a data path implies: a task folder's name (also for a split file such as ``train.jsonl``
    inside one), else the data file's name without its suffix. A ``task.json``'s ``task`` field is the task's
    kind (e.g. "topic"), not its name, and is not used."""
    p = Path(data)
    if p.is_dir():
        return p.resolve().name
    if p.stem in ("train", "validation", "valid", "dev", "test", "data"):
        return p.resolve().parent.name
    return p.stem


def sample_rows(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    """At most ``n`` of ``rows``, drawn at random by ``seed`` (all of them when ``n`` is None or larger)."""
    if n is None or len(rows) <= n:
        return rows
    return random.Random(seed).sample(rows, n)


def _check_labels(rows: list[dict], labels: list[str] | None, where: str) -> list[str]:
    seen = sorted({str(r["label"]) for r in rows})
    if labels is None:
        labels = seen
    labels = [str(x) for x in labels]
    unknown = sorted(set(seen) - set(labels))
    if unknown:
        raise PeftmergeError(f"data {where}: label(s) {', '.join(unknown)} not in the label set {labels}; fix --labels")
    if len(labels) < 2:
        raise PeftmergeError(f"data {where}: only one label ({labels[0]}); a classifier needs two or more")
    return labels


def input_text(row: dict, fmt: str) -> str:
    """The raw input a user would send for this row (kept as samples for routers)."""
    if fmt == "labelled":
        return str(row["text"]) + (f"\n{row['text_pair']}" if row.get("text_pair") else "")
    if fmt == "alpaca":
        return str(row["instruction"]) + (f"\n{row['input']}" if row.get("input") else "")
    if fmt == "prompt":
        return str(row["prompt"])
    users = [m.get("content", "") for m in row["messages"] if m.get("role") == "user"]
    return str(users[-1] if users else row["messages"][0].get("content", ""))


def sample_inputs(rows: list[dict], fmt: str, n: int = 32, seed: int = 0) -> list:
    """Up to ``n`` raw training inputs, drawn at random (by ``seed``); a labelled sentence pair is kept as
    ``[text, text_pair]`` so that routers encode it as the model does."""
    picked = random.Random(seed).sample(rows, min(n, len(rows)))
    return [[str(r["text"]), str(r["text_pair"])] if fmt == "labelled" and r.get("text_pair") else input_text(r, fmt)
            for r in picked]


def default_template(rows: list[dict]) -> str:
    """The label-word prompt template for labelled rows (pair template when rows carry ``text_pair``)."""
    return label_template(any(r.get("text_pair") for r in rows))


def prompt_and_completion(row: dict, fmt: str, template: str | None = None, task: str = "",
                          labels: list[str] | None = None) -> tuple[str, str]:
    """``(prompt, completion)`` strings for an alpaca, prompt or labelled row (chat goes through the template)."""
    if fmt == "alpaca":
        return alpaca_prompt(row["instruction"], row.get("input") or ""), str(row["output"])
    if fmt == "prompt":
        return str(row["prompt"]), str(row["completion"])
    if fmt == "labelled":
        prompt = (template or LABEL_TEMPLATE).format(
            task=task, labels=", ".join(labels or []), text=row["text"], text_pair=row.get("text_pair") or ""
        )
        return prompt, " " + str(row["label"])
    raise ValueError(f"no prompt/completion for {fmt} rows")
