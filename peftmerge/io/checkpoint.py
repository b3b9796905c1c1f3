"""Read full model checkpoints (a base model or a full fine-tune) lazily, tensor by tensor.

A checkpoint is a folder with ``config.json`` and ``model.safetensors`` or sharded
``model-0000x-of-0000n.safetensors`` with ``model.safetensors.index.json`` (what ``save_pretrained``
writes), and no ``adapter_config.json``. Headers are read (and checked) once; a tensor's bytes are read
with ``os.pread`` when asked for, straight into a fresh buffer. Unlike a memory map, nothing of the file
stays mapped into the process after the call, so the page cache never counts towards our memory and peak
RSS stays at the tensors in use, whatever the model size.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import PeftmergeError
from .safetensors_file import read_header

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# safetensors dtype names <-> torch dtypes
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}


def refuse_pickle_weights(path: str | Path) -> None:
    """A model folder whose weights are only pickles (``*.bin``, ``*.pt``, ``*.pth``) is refused before anything
    loads it: unpickling runs code, so peftmerge reads safetensors only."""
    path = Path(path)
    if not path.is_dir() or any(path.glob("*.safetensors")) or any(path.glob("*.gguf")):
        return
    pickles = sorted(f.name for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt") for f in path.glob(pattern))
    if pickles:
        raise PeftmergeError(f"{path}: only pickle weights ({', '.join(pickles[:3])}), which peftmerge never loads "
                             "(unpickling runs code); re-save the model with safetensors "
                             "(save_pretrained(..., safe_serialization=True))")


def is_checkpoint(path: str | Path) -> bool:
    """A folder holding a full model (config.json + model*.safetensors), not a LoRA adapter."""
    path = Path(path)
    if not path.is_dir() or (path / "adapter_config.json").exists():
        return False
    return (path / "config.json").exists() and ((path / SINGLE).exists() or (path / INDEX).exists())


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, byte range, dtype and shape."""

    file: Path
    start: int  # absolute byte offset in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class Checkpoint:
    """A full model folder, read one tensor at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.files = _shard_files(self.path)
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            with open(file, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
            for name, info in read_header(file).items():
                if info.get("dtype") not in DTYPES:
                    raise PeftmergeError(f"{file}: tensor {name!r} has dtype {info.get('dtype')!r}, which peftmerge "
                                         f"cannot read (supported: {', '.join(DTYPES)})")
                start, end = info["data_offsets"]
                self.tensors[name] = TensorInfo(file, 8 + header_len + start, end - start, DTYPES[info["dtype"]],
                                                tuple(info["shape"]))
        try:
            self.config = json.loads((self.path / "config.json").read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            raise PeftmergeError(f"{self.path / 'config.json'}: missing or not valid JSON; re-save the model") from None
        self._fds: dict[Path, int] = {}

    def names(self) -> list[str]:
        """Tensor names in storage order (file by file, by offset): reading in this order is sequential."""
        return sorted(self.tensors, key=lambda n: (self.files.index(self.tensors[n].file), self.tensors[n].start))

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def raw(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``name`` in its stored dtype: a fresh tensor, or read into ``out`` (a uint8 buffer that is
        at least as large) and returned as a view of it, so a caller can reuse one buffer for every tensor."""
        info = self.tensors[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        buf = torch.empty(info.nbytes, dtype=torch.uint8) if out is None else out[:info.nbytes]
        view, done = memoryview(buf.numpy()), 0
        while done < info.nbytes:  # pread may return short reads on huge ranges
            got = os.preadv(fd, [view[done:]], info.start + done)
            if got == 0:
                raise PeftmergeError(f"{info.file}: truncated while reading tensor {name!r}; re-download or re-save it")
            done += got
        return buf.view(info.dtype).view(info.shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass


def _shard_files(path: Path) -> list[Path]:
    if not path.exists():
        raise PeftmergeError(f"{path}: no such model folder; check the path")
    if not path.is_dir():
        raise PeftmergeError(f"{path}: not a folder; pass a model folder (config.json + model*.safetensors)")
    if (path / INDEX).exists():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise PeftmergeError(f"{path / INDEX}: not a valid safetensors index (no weight_map); re-save the model") \
                from None
        files = list(dict.fromkeys(weight_map.values()))
        for f in files:
            if not (path / f).exists():
                raise PeftmergeError(f"{path / INDEX} lists {f}, which is missing; re-download the model")
        return [path / f for f in files]
    if (path / SINGLE).exists():
        return [path / SINGLE]
    if any(path.glob("*.bin")):
        raise PeftmergeError(f"{path}: only pickle (.bin) weights found; re-save the model with safetensors "
                             "(save_pretrained(..., safe_serialization=True))")
    raise PeftmergeError(f"{path}: no model.safetensors or {INDEX}; pass a full model folder")
