"""GGUF base models as plain folders.

transformers' GGUF loading dequantizes the weights, but the model stays marked as quantized (``Trainer``,
``save_pretrained`` and ``quantization_config`` refuse it) and loading takes ~20 s for SmolLM2-135M on 2 cores.
:func:`plain_folder` writes a plain safetensors copy once into a cache folder (``$PEFTMERGE_CACHE``, default
``~/.cache/peftmerge``, subfolder ``gguf``) and returns it; later loads take about a second. The copy carries
``peftmerge_source.json`` naming the GGUF file it came from, so that it keeps that file's identity
(:mod:`peftmerge.io.base_model`). Every command loads a GGUF base through this copy (:func:`loadable`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .atomic import atomic_dir

log = logging.getLogger(__name__)
SOURCE_FILE = "peftmerge_source.json"


def cache_root() -> Path:
    """``$PEFTMERGE_CACHE`` (default ``~/.cache/peftmerge``)."""
    return Path(os.environ.get("PEFTMERGE_CACHE", Path.home() / ".cache" / "peftmerge"))


def split(model: str | os.PathLike) -> tuple[str, str | None]:
    """``(folder, gguf file name)`` of a ``.gguf`` path or of a folder holding one ``.gguf`` file and no
    ``config.json``; ``(model, None)`` for anything else."""
    p = Path(model).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        return str(p.parent), p.name
    if p.is_dir() and not (p / "config.json").exists():
        found = sorted(p.glob("*.gguf"))
        if len(found) == 1:
            return str(p), found[0].name
    return str(model), None


def loadable(ref: str | os.PathLike) -> str:
    """A folder ``from_pretrained`` loads quickly for the model ``ref``: a Hub id's local copy
    (:func:`peftmerge.io.base_model.local_path`), a GGUF file's cached plain copy, else ``ref`` itself."""
    from .base_model import local_path

    src, gguf = split(local_path(ref))
    return str(plain_folder(src, gguf)) if gguf else src


def plain_copy(model):
    """The same weights in a fresh model of the same class, without the GGUF ``quantization_config``."""
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    plain = type(model)(type(model.config).from_dict(cfg)).to(model.dtype)
    plain.load_state_dict(model.state_dict())
    return plain


def plain_folder(src: str, gguf: str) -> Path:
    """A cached plain (safetensors, float32) copy of the causal LM in ``src/gguf``, made once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    f = Path(src) / gguf
    st = f.stat()
    target = cache_root() / "gguf" / f"{f.stem}-{st.st_size}-{int(st.st_mtime)}"
    from .base_model import fingerprint, repo_id_of_copy

    source = json.dumps({"gguf": str(f.resolve()), "fingerprint": fingerprint(f), "repo_id": repo_id_of_copy(f)},
                        indent=2)
    if (target / "config.json").exists():
        if not (target / SOURCE_FILE).exists():  # a copy made before copies named their source
            (target / SOURCE_FILE).write_text(source)
        return target
    log.info("writing a plain copy of %s into %s (once)", f, target)
    plain = plain_copy(AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32))
    with atomic_dir(target, overwrite=True) as tmp:
        plain.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src, gguf_file=gguf).save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(source)
    return target
