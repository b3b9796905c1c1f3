"""Checked access to ``.safetensors`` files.

``safe_open`` fails on a bad file with messages that do not say which file; we check the header
ourselves first (8-byte little-endian length, a JSON header, offsets inside the file) so the user
gets one line naming the file and the fix.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import PeftmergeError

_MAX_HEADER = 100 * 1024 * 1024


def read_header(path: str | Path) -> dict[str, dict]:
    """Validate ``path`` and return its tensor table ``{name: {"dtype", "shape", "data_offsets"}}``."""
    path = Path(path)
    if not path.exists():
        raise PeftmergeError(f"{path}: no such file or directory; check the path")
    if not path.is_file():
        raise PeftmergeError(f"{path}: not a file; pass a .safetensors file or an adapter directory")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise PeftmergeError(f"{path}: not a safetensors file (only {size} bytes); pass a .safetensors adapter file")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or n + 8 > size:
            raise PeftmergeError(
                f"{path}: not a safetensors file or truncated (header says {n} bytes, file has {size}); "
                "re-download or re-save it"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PeftmergeError(f"{path}: corrupt safetensors header (not valid JSON); re-download or re-save it") from None
    if not isinstance(header, dict):
        raise PeftmergeError(f"{path}: corrupt safetensors header; re-download or re-save it")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    for name, info in header.items():
        try:
            start, end = info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise PeftmergeError(f"{path}: corrupt safetensors header at tensor {name!r}; re-download or re-save it") from None
        if not (0 <= start <= end <= data_len):
            raise PeftmergeError(
                f"{path}: truncated file: tensor {name!r} ends at byte {end} but only {data_len} data bytes exist; "
                "re-download or re-save it"
            )
    return header


def check_finite(t: torch.Tensor, path: str | Path, name: str) -> torch.Tensor:
    """Refuse NaN/Inf: a merge would spread them into every merged entry."""
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise PeftmergeError(f"{path}: tensor {name!r} contains NaN or Inf; this adapter is broken, retrain or drop it")
    return t


class TensorFile:
    """A safetensors file opened once and read tensor by tensor (nothing else is loaded)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.header = read_header(self.path)
        self._handle = None

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        if self._handle is None:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
        t = self._handle.get_tensor(name)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return check_finite(t, self.path, name)
