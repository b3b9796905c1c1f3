"""Write a full model folder: sharded safetensors with an index, written tensor by tensor.

Every output tensor's name, dtype and shape are known before any is computed (they are the base's), so
the shards are laid out up front and each shard's safetensors header is written first; each tensor's
bytes then go straight to the file as soon as it is merged. Nothing is buffered beyond the tensor being
written, and the files are the standard format (``safetensors.safe_open`` / ``from_pretrained`` read them).
``config.json``, the generation config and the tokenizer files are copied from the base model.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import PeftmergeError
from .checkpoint import INDEX, NAMES, SINGLE

# Files copied from the base model folder (besides the weights).
COPY = re.compile(r"^(config\.json|generation_config\.json|tokenizer.*|special_tokens_map\.json|added_tokens\.json|"
                  r"vocab\..*|merges\.txt|.*\.model|chat_template\..*|preprocessor_config\.json)$")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000 (also KB/MB/GB/TB, KiB/MiB/GiB, or a plain number of bytes)."""
    if isinstance(value, int):
        size = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).upper() not in _UNITS:
            raise PeftmergeError(f"shard size {value!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
        size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise PeftmergeError(f"shard size {value!r} must be positive")
    return size


@dataclass(frozen=True)
class Slot:
    """One output tensor's place: its name, dtype, shape and size in bytes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(slots: list[Slot], shard_size: int) -> list[list[Slot]]:
    """Split ``slots`` in order into shards of at most ``shard_size`` bytes (a bigger tensor gets its own)."""
    shards: list[list[Slot]] = [[]]
    size = 0
    for s in slots:
        if shards[-1] and size + s.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def _header(slots: list[Slot]) -> bytes:
    table, offset = {"__metadata__": {"format": "pt"}}, 0
    for s in slots:
        table[s.name] = {"dtype": NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(table, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


class ShardedWriter:
    """Write tensors, in the planned order, into ``folder``'s shards; :meth:`close` writes the index."""

    def __init__(self, folder: Path, slots: list[Slot], shard_size: int):
        self.folder = Path(folder)
        self.shards = plan_shards(slots, shard_size)
        n = len(self.shards)
        self.files = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._order = [(i, s) for i, shard in enumerate(self.shards) for s in shard]
        self._next = 0
        self._file = None
        self._shard = -1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor (``name`` must be the next planned one; cast to its planned dtype)."""
        i, slot = self._order[self._next]
        if name != slot.name or tuple(tensor.shape) != slot.shape:
            raise RuntimeError(f"writer expected {slot.name} {list(slot.shape)}, got {name} {list(tensor.shape)}")
        if i != self._shard:
            self._open(i)
        data = tensor.to(slot.dtype).contiguous().reshape(-1).view(torch.uint8)
        if data.numel():
            self._file.write(data.numpy())
        self._next += 1

    def _open(self, i: int) -> None:
        if self._file is not None:
            self._file.close()
        self._shard = i
        self._file = open(self.folder / self.files[i], "wb")
        self._file.write(_header(self.shards[i]))

    def close(self) -> None:
        """Finish the last shard and write ``model.safetensors.index.json`` (when sharded)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._next != len(self._order):
            raise RuntimeError(f"writer closed after {self._next} of {len(self._order)} tensors")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": sum(s.nbytes for _, s in self._order)},
                     "weight_map": {s.name: self.files[i] for i, s in self._order}}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2))

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def copy_model_files(base: Path, folder: Path, dtype: torch.dtype | None = None) -> list[str]:
    """Copy config, generation config and tokenizer files from ``base``; set the config's dtype if given."""
    copied = []
    for f in sorted(base.iterdir()):
        if f.is_file() and COPY.match(f.name):
            shutil.copyfile(f, folder / f.name)
            copied.append(f.name)
    if dtype is not None:
        cfg_path = folder / "config.json"
        cfg = json.loads(cfg_path.read_text())
        key = "torch_dtype" if "torch_dtype" in cfg and "dtype" not in cfg else "dtype"
        cfg[key] = str(dtype).removeprefix("torch.")
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return copied


def update_config(folder: Path, changes: dict) -> None:
    """Set keys of ``folder``'s config.json (also in its ``text_config``, where a composite model keeps them)."""
    cfg_path = Path(folder) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(changes)
    if isinstance(cfg.get("text_config"), dict):
        cfg["text_config"].update({k: v for k, v in changes.items() if k in cfg["text_config"]})
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
