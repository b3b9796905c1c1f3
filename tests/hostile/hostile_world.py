"""The inputs the hostile-input corpus works on, built once per module: tiny models, adapters, data, a router,
a merged adapter and a results file, all offline. Cases copy and damage what they need in their own folder;
the world itself must come out of every case byte for byte as it went in."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import torch

from conftest import make_adapter
from eval_fixtures import SENTIMENT, TOPIC, lora_adapter, save_bert, save_llama, write_task
from train_fixtures import sentiment_rows, write_jsonl


def build_world(root: Path) -> SimpleNamespace:
    """Everything the corpus reads, under ``root``."""
    from peftmerge.merge.combine import combine
    from peftmerge.routing.api import route_build

    w = SimpleNamespace(root=root)
    w.llama = save_llama(root / "llama")
    w.bert = save_bert(root / "bert")
    w.llama_ft = fine_tuned(w.llama, root / "llama-ft")
    w.a = make_adapter(root / "a", seed=1, r=4, alpha=8)
    w.b = make_adapter(root / "b", seed=2, r=2, alpha=4)
    kw = dict(classify=True, scale=0.5, targets=("query", "value"))
    w.sent = lora_adapter(w.bert, root / "sent", seed=1, task="sent", labels=["negative", "positive"], **kw)
    w.topic = lora_adapter(w.bert, root / "topic", seed=2, task="topic", labels=["sports", "business", "tech"], **kw)
    w.sent_val = write_task(root / "data" / "sent", SENTIMENT, name="validation.jsonl")
    w.topic_val = write_task(root / "data" / "topic", TOPIC, name="validation.jsonl")
    w.train = write_jsonl(root / "data" / "train.jsonl", sentiment_rows(8))
    w.router = root / "router"
    route_build([w.sent, w.topic], w.router, "centroid", examples={"sent": str(w.sent_val),
                                                                   "topic": str(w.topic_val)})
    w.merged = root / "merged"
    combine([str(w.a), str(w.b)], w.merged, "task_arithmetic", progress=False)
    w.results = root / "results.json"
    w.results.write_text(json.dumps({"name": "ta", "tasks": {"sent": {"accuracy": 0.5}}, "average": {"score": 0.5},
                                     "baselines": {}, "n_tasks": 2}))
    w.recipe = root / "recipe.yaml"
    w.recipe.write_text(f"merge_method: ties\nmodels:\n  - model: {w.a}\n  - model: {w.b}\n")
    return w


def fine_tuned(base: Path, out: Path) -> Path:
    """A full fine-tune of ``base``: its folder with every weight moved a little (for ``extract``)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, out)
    g = torch.Generator().manual_seed(0)
    for f in out.glob("*.safetensors"):
        sd = load_file(str(f))
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                   for k, v in sd.items()}, str(f), metadata={"format": "pt"})
    return out


def snapshot(*roots: Path) -> dict[str, str]:
    """{path: sha256 of a file, or 'dir', or 'link -> target'} of everything under ``roots`` (hidden entries too):
    equal before and after a case means no input changed and nothing was left behind."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                if p.is_symlink():
                    out[str(p)] = f"link -> {os.readlink(p)}"
                elif p.is_dir():
                    out[str(p)] = "dir"
                else:
                    out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# --- damaged files ---------------------------------------------------------------------------------------------

def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _first(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def damage_safetensors(path: Path, kind: str) -> None:
    """Rewrite the safetensors file at ``path`` broken in the way ``kind`` names."""
    from safetensors.torch import load_file, save_file

    data = path.read_bytes()
    header, body = split_safetensors(data)
    key = _first(header)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a safetensors file\n")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) - len(body) // 2 - 1])
    elif kind == "header_not_json":
        path.write_bytes(struct.pack("<Q", 12) + b"{not json!!}" + body)
    elif kind == "header_length_huge":
        path.write_bytes(struct.pack("<Q", 2 ** 62) + data[8:])
    elif kind == "header_is_a_list":
        path.write_bytes(join_safetensors([1, 2], body))  # type: ignore[arg-type]
    elif kind == "unknown_dtype":
        header[key]["dtype"] = "F99"
        path.write_bytes(join_safetensors(header, body))
    elif kind == "lying_offsets":  # the byte range is one element short of shape x itemsize
        start, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = [start, end - 4]
        path.write_bytes(join_safetensors(header, body))
    elif kind == "offsets_past_end":
        header[key]["data_offsets"] = [0, len(body) + 4096]
        path.write_bytes(join_safetensors(header, body))
    elif kind == "negative_shape":
        header[key]["shape"] = [-1] + header[key]["shape"][1:]
        path.write_bytes(join_safetensors(header, body))
    elif kind == "shape_not_a_list":
        header[key]["shape"] = "4x32"
        path.write_bytes(join_safetensors(header, body))
    elif kind in ("nan", "inf"):
        state = load_file(str(path))
        lora = next(k for k in state if "lora_A" in k)
        state[lora] = torch.full_like(state[lora], float(kind))
        save_file(state, str(path))
    elif kind == "rank0":
        state = load_file(str(path))
        for k in list(state):
            if "lora_A" in k:
                state[k] = torch.zeros(0, state[k].shape[1])
            elif "lora_B" in k:
                state[k] = torch.zeros(state[k].shape[0], 0)
        save_file(state, str(path))
    elif kind == "missing_b":
        state = load_file(str(path))
        save_file({k: v for k, v in state.items() if "lora_B" not in k}, str(path))
    elif kind == "dora":
        state = load_file(str(path))
        lora = next(k for k in state if "lora_A" in k)
        state[lora.replace("lora_A.weight", "lora_magnitude_vector")] = torch.ones(3)
        save_file(state, str(path))
    elif kind == "folder":
        path.unlink()
        path.mkdir()
    else:
        raise ValueError(kind)


class Boom:
    """A pickle that, if it were ever unpickled, would create the file ``marker`` (opening it for writing)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious_pickle(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"state": Boom(marker)}))
    return path


def copy(src: Path, dst: Path) -> Path:
    if Path(src).is_dir():
        shutil.copytree(src, dst)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return dst
