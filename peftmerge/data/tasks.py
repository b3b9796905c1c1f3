"""Task datasets for evaluation and search: JSONL rows plus what is needed to score them.

Two row shapes (those of ``../shared/data`` and of ``peftmerge train``):

- labelled classification: ``text`` [+ ``text_pair``] + ``label`` (a label word, e.g. "positive");
- instruction: ``instruction`` [+ ``input``] + ``output`` (scored by greedy generation).

The label set (in the order of a trained head's outputs) and the prompt template come from a
``peftmerge.json`` (written by ``peftmerge train``) when one is given, else from the ``task.json``
beside the data file, else from the labels seen in the data (sorted).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PeftmergeError
from ..io.meta import read_jsonl, read_meta  # noqa: F401  (read_meta re-exported for callers)

log = logging.getLogger(__name__)

@dataclass
class Task:
    """One task's evaluation data."""

    name: str
    path: Path
    rows: list[dict]
    labels: list[str] | None = None  # classification label words, in head order; None for instruction rows
    template: str | None = None  # str.format over a row's fields; "{label}" (optional) marks the answer slot
    meta: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "classify" if self.labels is not None else "generate"

    def references(self) -> list[str]:
        return [str(r["label"] if self.kind == "classify" else r["output"]) for r in self.rows]


def parse_pairs(values, option: str) -> dict[str, Path]:
    """``("sst2=a.jsonl", ...)`` -> ``{"sst2": Path("a.jsonl")}``, with one-line errors naming the option."""
    out: dict[str, Path] = {}
    for v in values or ():
        name, sep, path = str(v).partition("=")
        if not sep or not name.strip() or not path.strip():
            raise PeftmergeError(f"{option} {v!r} is not NAME=PATH (e.g. {option} sst2=data/sst2/test.jsonl)")
        if name in out:
            raise PeftmergeError(f"{option} names task {name!r} twice; give each task once")
        out[name.strip()] = Path(path.strip())
    return out


def _check_rows(name: str, path: Path, rows: list[dict]) -> str:
    first = rows[0]
    kind = "generate" if "output" in first and "label" not in first else "classify"
    need = ("instruction", "output") if kind == "generate" else ("text", "label")
    for i, row in enumerate(rows, 1):
        for key in need:
            if key not in row:
                raise PeftmergeError(f"{path}: row {i} has no {key!r} field; task {name} rows need "
                                     f"{' + '.join(need)} (see ../shared/data/README.md)")
    return kind


def load_task(name: str, path: str | Path, *, limit: int | None = None, meta: dict | None = None) -> Task:
    """Read a task's rows; ``meta`` is a ``peftmerge.json`` of an adapter trained on it (labels, template)."""
    path = Path(path)
    rows = read_jsonl(path, limit)
    kind = _check_rows(name, path, rows)
    meta = dict(meta or {})
    if kind == "generate":
        return Task(name, path, rows, None, None, meta)
    labels = meta.get("labels")
    if not labels:
        spec = path.parent / "task.json"
        if spec.is_file():
            try:
                labels = json.loads(spec.read_text(encoding="utf-8")).get("labels")
            except (ValueError, AttributeError):  # bad JSON, bytes that are not UTF-8, not an object
                raise PeftmergeError(f"{spec}: not a valid task.json; fix it (\"labels\": [...]) or remove it") \
                    from None
            if labels is not None and (not isinstance(labels, list)
                                       or not all(isinstance(x, (str, int)) for x in labels)):
                raise PeftmergeError(f"{spec}: 'labels' is not a list of label names; fix it or remove it")
    if not labels:
        labels = sorted({str(r["label"]) for r in rows})
        log.warning("%s: no label set in a peftmerge.json or task.json; using the sorted labels seen: %s",
                    path, labels)
    labels = [str(x) for x in labels]
    unknown = sorted({str(r["label"]) for r in rows} - set(labels))
    if unknown:
        raise PeftmergeError(f"{path}: labels {unknown} are not in the task's label set {labels}; "
                             "check the data file or the adapter's peftmerge.json")
    return Task(name, path, rows, labels, meta.get("template"), meta)


def icl_examples(train: Task, k: int, seed: int = 0) -> list[dict]:
    """``k`` demonstrations from the train split, drawn with a seeded RNG (label-balanced round robin)."""
    if k <= 0:
        return []
    rng = random.Random(seed)
    if train.kind == "generate":
        return rng.sample(train.rows, min(k, len(train.rows)))
    by_label: dict[str, list[dict]] = {}
    for r in train.rows:
        by_label.setdefault(str(r["label"]), []).append(r)
    pools = [rng.sample(v, len(v)) for _, v in sorted(by_label.items())]
    picked: list[dict] = []
    while len(picked) < k and any(pools):
        for pool in pools:
            if pool and len(picked) < k:
                picked.append(pool.pop())
    rng.shuffle(picked)
    return picked


def refuse_test_split(path: str | Path, option: str) -> None:
    """Search must never see a test split: refuse a file named ``test*``."""
    name = Path(path).name
    if name.lower().startswith("test"):
        raise PeftmergeError(f"{option} {path}: looks like a test split ({name}); search tunes on validation "
                             "data only; pass the validation file (e.g. validation.jsonl)")
