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
# Bytes per element of each safetensors dtype.
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
            "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8}


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
        bad = _entry_error(info, data_len)
        if bad:
            raise PeftmergeError(f"{path}: corrupt safetensors header at tensor {name!r} ({bad}); re-download or "
                                 "re-save it")
    return header


def _entry_error(info, data_len: int) -> str | None:
    """What is wrong with one header entry (its dtype, shape and byte range must agree), or None."""
    if not isinstance(info, dict):
        return "not an object"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in ITEMSIZE:
        return f"unknown dtype {dtype!r}"
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        return f"shape {shape!r} is not a list of sizes"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(
            isinstance(o, int) and not isinstance(o, bool) for o in offsets):
        return f"data_offsets {offsets!r} are not [start, end]"
    start, end = offsets
    if not 0 <= start <= end:
        return f"data_offsets {offsets} are not a byte range"
    if end > data_len:
        return f"truncated file: it ends at byte {end} but only {data_len} data bytes exist"
    numel = 1
    for d in shape:
        numel *= d
    if end - start != numel * ITEMSIZE[dtype]:
        return f"{end - start} bytes for shape {shape} of {dtype}, which needs {numel * ITEMSIZE[dtype]}"
    return None


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
        try:
            if self._handle is None:
                self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            t = self._handle.get_tensor(name)
        except Exception as e:  # noqa: BLE001  (safetensors' own error type, e.g. a dtype torch cannot hold)
            if isinstance(e, PeftmergeError):
                raise
            raise PeftmergeError(f"{self.path}: cannot read tensor {name!r} ({str(e).splitlines()[0][:120]}); "
                                 "re-download or re-save it") from None
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return check_finite(t, self.path, name)
