"""Share an output folder on the Hugging Face Hub.

:func:`push` detects what the folder holds (adapter, merged adapter, merged model, router), makes
sure it carries a model card (generated from the folder's own metadata when missing, without
touching the folder), creates the repo and uploads through huggingface_hub's ``upload_folder``
(which streams large files through Xet/LFS and commits in batches). Nothing here writes HTTP by hand.

What is uploaded is an allow-list (:func:`plan_push`): the files peftmerge writes (weights, configs,
tokenizer files, the card, ``peftmerge.json``, ``merge_report.json``, ``heads/``, plots), never a hidden
file, another folder, or a symlink out of the folder; and the text files go up with every absolute local
path replaced by a name (or the Hub repo id of a cache snapshot). ``push(..., dry_run=True)`` /
``peftmerge push --dry-run`` shows all of it and uploads nothing.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from huggingface_hub import ModelCard

from ..errors import PeftmergeError
from ..io.card import KINDS, REPO_PLACEHOLDER, RESULTS_FILE, load_results, make_card, with_results
from ..io.hub import is_offline, looks_like_repo_id, snapshot_of, valid_revision
from ..version import __version__

logger = logging.getLogger(__name__)

CARD = "README.md"
_RECIPE_KEYS = ("method", "params", "weights", "rank", "dtype", "inputs", "base_model")


def detect_kind(folder: str | Path) -> str:
    """What ``folder`` holds: the ``kind`` in its peftmerge.json, else ``router`` (router.json), ``merged-adapter`` (adapter_config.json and
    merge_report.json), ``adapter`` (adapter_config.json) or ``merged-model`` (config.json + safetensors)."""
    folder = Path(folder)
    declared = _read_json(folder / "peftmerge.json").get("kind")
    if declared in KINDS:
        return declared
    if (folder / "router.json").is_file():
        return "router"
    if (folder / "adapter_config.json").is_file():
        return "merged-adapter" if (folder / "merge_report.json").is_file() else "adapter"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return "merged-model"
    raise PeftmergeError(
        f"{folder}: not a peftmerge output (no adapter_config.json, router.json, or config.json with .safetensors); "
        "pass the folder written by train, combine or route"
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PeftmergeError(f"{path}: not valid JSON ({e.msg}); fix or regenerate it before pushing") from None
    return data if isinstance(data, dict) else {}


def card_from_folder(folder: str | Path, kind: str | None = None, repo_id: str | None = None):
    """A :class:`~huggingface_hub.ModelCard` built from what ``folder`` says about itself: the base model
    (adapter_config.json, router.json, merge_report.json or config.json), the recipe (merge_report.json or
    router.json) and eval results (results.json)."""
    folder = Path(folder)
    kind = kind or detect_kind(folder)
    adapter_cfg = _read_json(folder / "adapter_config.json")
    report = _read_json(folder / "merge_report.json")
    router = _read_json(folder / "router.json") if kind == "router" else {}
    meta = _read_json(folder / "peftmerge.json")
    if "recipe" in report:
        recipe = report["recipe"]
    elif report:  # the merge report: keep what decided the merge, not the per-module diagnostics
        recipe = {k: report[k] for k in _RECIPE_KEYS if k in report}
    elif router:
        recipe = {"router": router}
    else:  # a trained adapter: its training settings (peftmerge.json's config)
        recipe = {"task": meta.get("task"), "method": meta.get("method"), **(meta.get("config") or {})} \
            if isinstance(meta.get("config"), dict) else {}
    base = (
        adapter_cfg.get("base_model_name_or_path")
        or report.get("base_model")
        or (report.get("recipe") or {}).get("base_model")
        or router.get("base_model")
    )
    if not base and kind == "merged-model":
        base = _read_json(folder / "config.json").get("_name_or_path")
    from ..io.card import classifier_heads

    return make_card(
        kind=kind,
        base_model=base,
        heads=classifier_heads(folder) if kind in ("adapter", "merged-adapter") else None,
        recipe=recipe or None,
        results=load_results(folder / RESULTS_FILE),
        tags=tuple(report.get("tags", ())),
        datasets=tuple(report.get("datasets", ())),
        repo_id=repo_id,
    )


def _card_to_upload(folder: Path, kind: str, repo_id: str) -> str | None:
    """The card text to upload instead of the folder's own ``README.md``, or ``None`` to upload it as is.

    No README.md: one generated from the folder. A peftmerge card: the same card with the repo id in its
    usage snippet and the results of a later eval (``results.json``) in its results table.
    """
    path = folder / CARD
    if not path.is_file():
        logger.info("no %s in %s: uploading a generated model card", CARD, folder)
        return str(card_from_folder(folder, kind, repo_id=repo_id))
    try:
        card = ModelCard.load(path)
    except Exception:  # not a card huggingface_hub can parse: upload it as is, the Hub will say what is wrong
        return None
    if "peftmerge" not in (card.data.tags or []):
        return None  # someone else's card: leave it alone
    results = load_results(folder / RESULTS_FILE)
    updated = with_results(card, results) if results else card
    updated = ModelCard(updated.content.replace(REPO_PLACEHOLDER, repo_id))
    return str(updated) if updated.content != card.content else None


def _token(token: str | None) -> str:
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise PeftmergeError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (the local output is kept)")
    return token


def _network_error(e: BaseException) -> bool:
    """Connection refused, DNS failure, timeout: whatever HTTP client huggingface_hub uses underneath."""
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"TransportError", "ConnectionError", "TimeoutError", "Timeout", "TimeoutException"})


def _explain(e: BaseException, repo_id: str, folder: Path) -> PeftmergeError | None:
    """One line for a failed push (the local output is always kept); ``None`` for an unexpected error (a bug).

    Looks through the exception chain: huggingface_hub wraps LFS upload failures in a RuntimeError.
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    kept = f"the local output {folder} is kept"
    while e is not None:
        if isinstance(e, OfflineModeIsEnabled):
            return PeftmergeError(f"HF_HUB_OFFLINE=1 is set: unset it to push to {repo_id} ({kept})")
        if isinstance(e, HfHubHTTPError):
            status = e.response.status_code if e.response is not None else None
            server = (e.server_message or "").strip().splitlines()
            why = f": {server[0]}" if server else ""
            if status == 400:
                return PeftmergeError(
                    f"the Hub rejected the upload to {repo_id} (HTTP 400{why}); fix the file it names, "
                    f"e.g. README.md's metadata ({kept})"
                )
            if status == 401 and not isinstance(e, RepositoryNotFoundError):
                return PeftmergeError(f"the Hub refused the token (HTTP 401{why}); check HF_TOKEN or run `hf auth login` ({kept})")
            if status in (401, 403, 404, 409):
                return PeftmergeError(
                    f"cannot write to {repo_id} (HTTP {status}{why}): it belongs to someone else or your token lacks "
                    f"write access; push to a repo in your own namespace ({kept})"
                )
            return PeftmergeError(f"the Hub answered HTTP {status}{why} while pushing to {repo_id}; try again later ({kept})")
        if _network_error(e):
            return PeftmergeError(
                f"cannot reach the Hub at {constants.ENDPOINT} (network down?): {type(e).__name__} ({kept})"
            )
        e = e.__cause__ or e.__context__
    return None


# The files peftmerge writes (and a Hub repo of its outputs needs), by name at the top of the folder.
ALLOWED = ("README.md", "peftmerge.json", "merge_report.json", "results.json", "results.md", "search.json",
           "router.json", "router.safetensors", "adapter_config.json", "adapter_model.safetensors",
           "bitfit_model.safetensors", "config.json", "generation_config.json", "model.safetensors",
           "model-*-of-*.safetensors", "model.safetensors.index.json", "tokenizer*", "special_tokens_map.json",
           "added_tokens.json", "vocab.*", "merges.txt", "*.model", "chat_template.*", "preprocessor_config.json",
           "*.png")
HEADS = "heads"  # merged adapters: heads/<task>.safetensors
# Metadata files whose local paths are replaced (never tokenizer files: a vocabulary may hold "/..." tokens).
SCRUBBED = ("README.md", "peftmerge.json", "merge_report.json", "results.json", "results.md", "search.json",
            "router.json", "adapter_config.json", "config.json")
_OUTPUT_FILES = ("adapter_config.json", "peftmerge.json", "router.json", "config.json")
# An absolute path inside text: starts with / (or ~/, or a Windows drive) after a delimiter; runs to the next one.
_ABS_PATH = re.compile(r"(?<![\w.:/~-])(?:~|[A-Za-z]:)?[/\\][^\s`'\"()<>|,;*\[\]{}]*")


@dataclass
class PushPlan:
    """What :func:`push` would upload: ``files`` [(path in the repo, size)], the ``card`` text, what was left out."""

    folder: Path
    kind: str
    files: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    card: str = ""


def _allowed(folder: Path, rel: PurePosixPath, kind: str) -> bool:
    """Whether ``rel`` (a file under ``folder``) is on the allow-list. A router may hold its adapters in
    subfolders: a subfolder that is itself an adapter (adapter_config.json / peftmerge.json) is allowed whole."""
    parts = rel.parts
    if any(p.startswith(".") for p in parts):
        return False
    if len(parts) == 1:
        return any(fnmatch.fnmatchcase(parts[0], pat) for pat in ALLOWED)
    if parts[0] == HEADS:
        return len(parts) == 2 and parts[1].endswith(".safetensors")
    if kind == "router":  # the adapters of a router kept inside its folder (e.g. adapters/<task>/)
        for k in range(1, len(parts)):
            sub = folder.joinpath(*parts[:k])
            if any((sub / f).is_file() for f in _OUTPUT_FILES):
                return _allowed(sub, PurePosixPath(*parts[k:]), "adapter")
    return False


def _files(folder: Path, kind: str) -> tuple[list[tuple[str, Path]], list[str]]:
    """([(path in the repo, real file)], [left out]) of ``folder``: the allow-list, no symlink leaving it."""
    root = folder.resolve()
    keep, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        here = Path(dirpath)
        for d in list(dirnames):
            if (here / d).is_symlink():  # never walked: a linked folder may lead anywhere
                dirnames.remove(d)
                skipped.append((here / d).relative_to(folder).as_posix() + "/ (symlink)")
        for name in sorted(filenames):
            path = here / name
            rel = PurePosixPath(path.relative_to(folder).as_posix())
            real = path.resolve()
            if path.is_symlink() and root not in real.parents:
                skipped.append(f"{rel} (symlink out of the folder)")
            elif not real.is_file():
                skipped.append(f"{rel} (not a file)")
            elif not _allowed(folder, rel, kind):
                skipped.append(str(rel))
            else:
                keep.append((str(rel), real))
    return sorted(keep), sorted(skipped)


def _local_name(path: str) -> str:
    """What stands for an absolute local path in an uploaded file: the repo id of a Hub cache snapshot, else
    the last part of the path (a folder's or file's name says what it was without saying where)."""
    snapshot = snapshot_of(path)
    if snapshot:
        return snapshot[0]
    parts = [p for p in re.split(r"[/\\]", path) if p and p != "~" and not re.fullmatch(r"[A-Za-z]:", p)]
    return parts[-1] if parts else "."


def scrub(value):
    """``value`` (JSON data or text) with every absolute local path replaced by :func:`_local_name`."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    if isinstance(value, str):
        return _ABS_PATH.sub(lambda m: _local_name(m.group(0)) if _is_local_path(m.group(0)) else m.group(0), value)
    return value


def _is_local_path(s: str) -> bool:
    """A path that names a place on this machine (at least two parts: ``/data/x``, not a lone ``/``)."""
    return len([p for p in re.split(r"[/\\]", s) if p]) >= 1 and (s.startswith(("/", "~", "\\"))
                                                                 or re.match(r"[A-Za-z]:", s) is not None)


def _scrubbed_text(path: Path) -> bytes | None:
    """The text file at ``path`` with local paths replaced, or None when it holds none (uploaded as it is)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if data is not None:
            clean = scrub(data)
            return None if clean == data else (json.dumps(clean, indent=2, ensure_ascii=False) + "\n").encode()
    clean = scrub(text)
    return None if clean == text else clean.encode()


def plan_push(folder: str | Path, repo_id: str, *, revision: str | None = None) -> PushPlan:
    """What :func:`push` would upload (no token, no network): the allowed files and the card."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PeftmergeError(f"{folder}: no such directory; pass the output folder to push")
    check_repo_id(repo_id, revision)
    kind = detect_kind(folder)
    files, skipped = _files(folder, kind)
    from ..io.safetensors_file import read_header

    for _, real in files:
        if real.suffix == ".safetensors":
            read_header(real)  # a damaged weights file is named now, not found by whoever downloads it
    card = _card_to_upload(folder, kind, repo_id)
    if card is None:
        card = (folder / CARD).read_text(encoding="utf-8") if (folder / CARD).is_file() else ""
    card = scrub(_hub_base_models(card))
    listed = [(rel, real.stat().st_size) for rel, real in files if rel != CARD]
    listed.append((CARD, len(card.encode())))
    return PushPlan(folder, kind, sorted(listed), skipped, card)


def _hub_base_models(text: str) -> str:
    """The card with only Hub repo ids as its metadata's ``base_model`` (a local path there names nothing on the
    Hub: it is dropped, with ``base_model_relation`` when no base is left); any other card is returned as is."""
    from ..io.hub import repo_id_of

    try:
        card = ModelCard(text)
    except Exception:  # noqa: BLE001  (no metadata block, or one huggingface_hub cannot read: left to the Hub)
        return text
    bases = card.data.base_model
    if not bases:
        return text
    listed = [bases] if isinstance(bases, str) else list(bases)
    kept = [b for b in listed if isinstance(b, str) and repo_id_of(b) == b]
    if kept == listed:
        return text
    card.data.base_model = (kept[0] if isinstance(bases, str) else kept) if kept else None
    if not kept:
        card.data.base_model_relation = None
    return str(card)


def check_repo_id(repo_id: str, revision: str | None = None) -> None:
    """One line for a repo id or a branch name the Hub would refuse (or that climbs out like ``../..``)."""
    if not looks_like_repo_id(repo_id) or "@" in repo_id:
        raise PeftmergeError(f"--repo-id {repo_id!r} is not a Hub repo id; use user/name (use --revision for a branch)")
    if revision is not None and not valid_revision(revision):
        raise PeftmergeError(f"--revision {revision!r} is not a branch name; use letters, digits, '.', '_', '-' and "
                             "'/' (no '..', no leading '.' or '-')")


def _stage(folder: Path, stage: Path, files: list[tuple[str, Path]], card: str) -> None:
    """The upload folder: text files scrubbed of local paths, weights as links to the originals (no copy)."""
    for rel, real in files:
        dst = stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel == CARD:
            continue
        clean = _scrubbed_text(real) if real.name in SCRUBBED else None
        if clean is not None:
            dst.write_bytes(clean)
            continue
        try:
            os.symlink(real, dst)
        except OSError:  # no symlinks here (e.g. Windows without the privilege): hard link, then copy
            try:
                os.link(real, dst)
            except OSError:
                import shutil

                shutil.copy2(real, dst)
    (stage / CARD).write_text(card, encoding="utf-8")


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Upload an output folder to the Hub repo ``repo_id`` (created if needed); return the repo's URL.

    Only the allow-listed files go up (see :func:`plan_push`, which lists them without uploading), with no
    absolute local path in them; ``folder`` itself is never modified.

    Args:
        folder: an output of train, combine or route (see :func:`detect_kind`).
        repo_id: ``user/name`` (or ``org/name``).
        private: create the repo private (an existing repo keeps its visibility).
        revision: branch to push to (created from ``main`` if missing); default ``main``.
        commit_message: defaults to "Upload <kind> with peftmerge <version>".
        token: defaults to ``HF_TOKEN`` or the token saved by ``hf auth login``.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    plan = plan_push(folder, repo_id, revision=revision)
    if is_offline():
        raise PeftmergeError(f"HF_HUB_OFFLINE=1 is set: unset it to push to {repo_id} (the local output {folder} is "
                             "kept)")
    api = HfApi(token=_token(token), library_name="peftmerge", library_version=__version__)
    message = commit_message or f"Upload {plan.kind} with peftmerge {__version__}"
    files, _ = _files(folder, plan.kind)
    if plan.skipped:
        logger.info("not uploaded (not a file peftmerge writes): %s", ", ".join(plan.skipped))

    with tempfile.TemporaryDirectory(prefix="peftmerge-push-") as tmp:
        upload_dir = Path(tmp)
        _stage(folder, upload_dir, files, plan.card)
        try:
            url = api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            commit = api.upload_folder(
                folder_path=upload_dir, repo_id=repo_id, revision=revision, commit_message=message, repo_type="model"
            )
        except PeftmergeError:
            raise
        except Exception as e:
            explained = _explain(e, repo_id, folder)
            if explained is None:
                raise
            raise explained from e
    logger.info("pushed %s to %s (%s)", folder, repo_id, getattr(commit, "commit_url", ""))
    url = str(url).rstrip("/")
    return f"{url}/tree/{revision}" if revision and revision != "main" else url
