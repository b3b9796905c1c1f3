"""Small shared readers: an adapter's ``peftmerge.json``, JSONL data files and YAML configs (one-line errors)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..errors import PeftmergeError

META = "peftmerge.json"


def read_meta(folder: str | Path | None) -> dict:
    """The ``peftmerge.json`` of an adapter folder, or beside an adapter file ({} when there is none)."""
    if folder is None:
        return {}
    p = Path(folder)
    p = p / META if p.is_dir() else p.parent / META
    if not p.is_file():
        return {}
    try:
        meta = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PeftmergeError(f"{p}: not valid JSON; fix or re-save it") from None
    return meta if isinstance(meta, dict) else {}


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict]:
    """The JSON objects of a JSONL file (at most ``limit``), with a one-line error naming a bad line."""
    path = Path(path)
    if not path.is_file():
        raise PeftmergeError(f"{path}: no such data file; give a JSONL file (one JSON object per line)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
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
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PeftmergeError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix {what}") from None
