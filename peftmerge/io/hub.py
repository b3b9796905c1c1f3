"""Hub ids wherever a path is accepted: ``user/name`` or ``user/name@revision``.

:func:`resolve` returns a local path as is and fetches a Hub repo through huggingface_hub's cache
(``snapshot_download``), so a second run, or a run with ``HF_HUB_OFFLINE=1``, reads the cached
snapshot. :func:`describe_input` pins an input for a recipe (Hub revision or file sha256).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from ..errors import PeftmergeError

# user/name, optionally @revision (a branch, tag or commit). Names follow the Hub's rules:
# letters, digits, '-', '_', '.', no leading '-' or '.', no '--' or '..', at most 96 characters.
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?:@(?P<rev>[A-Za-z0-9._/-]+))?$")


def _is_true(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now, or as huggingface_hub read it at import."""
    from huggingface_hub import constants

    env = _is_true(os.environ.get("HF_HUB_OFFLINE")) or _is_true(os.environ.get("TRANSFORMERS_OFFLINE"))
    return env or bool(constants.HF_HUB_OFFLINE)


def valid_revision(rev: str) -> bool:
    """A branch, tag or commit name as git allows it: no ``..``, no empty or dot-led component, no ``.lock``
    ending, nothing a path could climb out with."""
    parts = str(rev).split("/")
    return (re.fullmatch(r"[A-Za-z0-9._/-]+", str(rev)) is not None and ".." not in rev and not rev.startswith("-")
            and all(p and not p.startswith(".") and not p.endswith(".lock") for p in parts))


def looks_like_repo_id(s: str) -> bool:
    """True for ``user/name`` or ``user/name@revision`` (not a path such as ``./a/b`` or ``/a/b``)."""
    m = _REPO_ID.match(str(s))
    return (bool(m) and "--" not in m["repo"] and ".." not in m["repo"]
            and (m["rev"] is None or valid_revision(m["rev"])))


def split_ref(ref: str) -> tuple[str, str | None]:
    """``"user/name@rev"`` -> ``("user/name", "rev")``; raises if ``ref`` is not a repo id."""
    m = _REPO_ID.match(str(ref))
    if not m or not looks_like_repo_id(ref):
        raise PeftmergeError(f"{ref!r} is not a Hub repo id; use user/name or user/name@revision")
    return m["repo"], m["rev"]


def resolve(ref: str | os.PathLike, *, allow_patterns: list[str] | str | None = None) -> Path:
    """A local path (returned as is) or a Hub repo id resolved to its cached snapshot folder.

    ``allow_patterns`` limits what is downloaded (e.g. ``["adapter_*", "*.json"]``). Raises a
    one-line :class:`PeftmergeError` when the path does not exist and is not a repo id, when the repo
    does not exist, and when the Hub cannot be reached (or ``HF_HUB_OFFLINE=1``) and nothing is cached.
    """
    path = Path(ref).expanduser()
    if path.exists():
        return path
    ref = str(ref)
    if not looks_like_repo_id(ref):
        raise PeftmergeError(f"{ref}: no such file or directory, and not a Hub repo id (user/name[@revision]); check the path")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, revision = split_ref(ref)
    offline = is_offline()
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns, local_files_only=offline)
    except GatedRepoError:
        raise PeftmergeError(f"{ref}: gated repo on the Hub; accept its terms on the Hub page and log in (hf auth login)") from None
    except RevisionNotFoundError:
        raise PeftmergeError(f"{ref}: revision {revision!r} not found on the Hub; check the branch, tag or commit") from None
    except RepositoryNotFoundError:
        raise PeftmergeError(
            f"{ref}: not a local path and no such repo on the Hub (or it is private: set HF_TOKEN or run hf auth login)"
        ) from None
    except LocalEntryNotFoundError:
        if offline:
            raise PeftmergeError(
                f"{ref}: no such local path, and not in the Hugging Face cache with HF_HUB_OFFLINE=1; "
                "check the path, or unset HF_HUB_OFFLINE to download it"
            ) from None
        raise PeftmergeError(
            f"{ref}: no such local path, and the Hub cannot be reached to download it (not cached); "
            "check the path or your network"
        ) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise PeftmergeError(f"{ref}: the Hub answered HTTP {status} while downloading; try again later") from None
    return Path(folder)


def _sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def snapshot_of(path: str | os.PathLike) -> tuple[str, str] | None:
    """``(repo_id, revision)`` of a path in huggingface_hub's cache (``.../models--user--name/snapshots/REV[/...]``),
    else None."""
    parts = Path(os.path.abspath(path)).parts  # not resolve(): cached files are symlinks into blobs/
    if "snapshots" in parts:
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        if i >= 1 and parts[i - 1].startswith("models--") and i + 1 < len(parts):
            return parts[i - 1][len("models--"):].replace("--", "/"), parts[i + 1]
    return None


def repo_id_of(ref: str | os.PathLike) -> str | None:
    """The Hub repo id a model reference stands for, for metadata such as a card's ``base_model``: ``ref`` itself
    when it is a repo id (``user/name``, or a legacy single name such as ``gpt2``) and not a local path, the repo of
    a cache snapshot, else None (a local folder means nothing on the Hub)."""
    s = str(ref)
    named = (looks_like_repo_id(s) and "@" not in s) or re.fullmatch(_PART, s) is not None
    if named and not Path(s).expanduser().exists():
        return s
    snapshot = snapshot_of(s)
    return snapshot[0] if snapshot else None


def describe_input(ref: str | os.PathLike, path: Path | None = None) -> dict:
    """Pin an input for a recipe: ``{"source", "revision"}`` for a Hub snapshot, ``{"source", "sha256"}``
    (of its ``.safetensors`` files, in name order, or of the file itself) for a local path."""
    path = Path(path) if path is not None else resolve(ref)
    snapshot = snapshot_of(path)
    if snapshot:
        return {"source": snapshot[0], "revision": snapshot[1]}
    if path.is_file():
        files = [path]
    else:
        files = sorted(path.glob("*.safetensors")) or sorted(p for p in path.iterdir() if p.is_file())
    return {"source": str(ref), "sha256": _sha256(files)}
