"""Small shared readers: an adapter's ``peftmerge.json``, JSONL data files and YAML configs (one-line errors), and
the sha256 that pins an input file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from ..errors import PeftmergeError

META = "peftmerge.json"


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 16 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def read_meta(folder: str | Path | None) -> dict:
    """The ``peftmerge.json`` of an adapter folder, or beside an adapter file ({} when there is none)."""
    if folder is None:
        return {}
    p = Path(folder)
    p = p / META if p.is_dir() else p.parent / META
    if not p.is_file():
        return {}
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PeftmergeError(f"{p}: not valid JSON; fix or re-save it") from None
    if not isinstance(meta, dict):
        return {}
    for key in ("task", "shape", "template", "base_model"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise PeftmergeError(f"{p}: {key!r} {meta[key]!r} is not a string; fix or re-save it")
    labels = meta.get("labels")
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, (str, int)) for x in labels)):
        raise PeftmergeError(f"{p}: 'labels' is not a list of label names; fix or re-save it")
    return meta


def jsonl_lines(path: str | Path):
    """``(line number, text)`` of each non-blank line of a JSONL file, split on ``\\n`` only: U+2028, U+0085
    and the like are legal inside JSON strings. A one-line error for bytes that are not UTF-8."""
    path = Path(path)
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):  # binary iteration splits on b"\n" alone
            try:
                line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
            except UnicodeDecodeError:
                raise PeftmergeError(f"{path}:{i}: not UTF-8 text (a binary file?); give a JSONL file, one JSON "
                                     "object per line") from None
            if line.strip():
                yield i, line


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict]:
    """The JSON objects of a JSONL file (at most ``limit``), with a one-line error naming a bad line."""
    path = Path(path)
    if not path.is_file():
        raise PeftmergeError(f"{path}: no such data file; give a JSONL file (one JSON object per line)")
    rows = []
    for i, line in jsonl_lines(path):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise PeftmergeError(f"{path}:{i}: not valid JSON; each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise PeftmergeError(f"{path}:{i}: not a JSON object")
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise PeftmergeError(f"{path}: no rows; the data file is empty")
    return rows


def read_yaml(path: str | Path, what: str) -> object:
    """The parsed YAML file ``path`` (``what`` it should be names the fix when it is missing or broken)."""
    path = Path(path)
    if not path.is_file():
        raise PeftmergeError(f"{path}: no such file; pass {what}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise PeftmergeError(f"{path}: not UTF-8 text (a binary file?); fix {what}") from None
    except yaml.YAMLError as e:
        raise PeftmergeError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix {what}") from None
