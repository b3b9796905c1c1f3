"""``tokenizer_source`` of YAML recipes: which tokenizer a merged model carries, as mergekit decides it.

mergekit builds the output's vocabulary (``base``: the base model's; ``union``: every model's tokens;
a model: that model's), then re-maps every model's embedding rows to it before merging. peftmerge merges
the tensors as stored, so it does exactly what mergekit does where that re-mapping is the identity: every
model gives each token of the output vocabulary the same id, and the output vocabulary has as many tokens
as the embeddings have rows. Then the output gets the chosen tokenizer (and its chat template); anything
else is refused with one line. A model folder without tokenizer files counts as having the base's
tokenizer (as in mergekit), and so does a LoRA adapter.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from ..errors import PeftmergeError
from ..io.hub import resolve

TOKENIZER_FILES = re.compile(r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt|"
                             r".*\.model|chat_template\..*)$")


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file()


def _vocab(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).get_vocab()


def _rows(folder: Path) -> int | None:
    """The vocabulary size in the model's config.json (mergekit's count of embedding rows)."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    data = json.loads(cfg.read_text())
    return data.get("vocab_size") or (data.get("text_config") or {}).get("vocab_size")


def output_tokenizer(recipe, base: Path, sources) -> Path | None:
    """The folder whose tokenizer the output gets instead of BASE's (None: BASE's), after checking that
    mergekit's embedding re-mapping would be the identity. (Then ``union`` is the base's vocabulary too: every
    id below the row count holds the base's token in every model.)"""
    source = recipe.tokenizer_source
    if source is None:
        return None
    where = f"{recipe.file}: tokenizer_source {source}"
    chosen = base if source in ("base", "union") else resolve(source)
    if not _has_tokenizer(chosen):
        raise PeftmergeError(f"{where}: {chosen} has no tokenizer files; name a model folder with a tokenizer")
    rows = _rows(base)
    out = _vocab(chosen)
    if rows is None or len(out) != rows:
        raise PeftmergeError(f"{where}: the output vocabulary has {len(out)} tokens but the base model's embeddings "
                             f"have {rows} rows; mergekit would resize them, peftmerge does not: use mergekit-yaml, "
                             "or drop tokenizer_source to keep the base model's tokenizer")
    models = [base] + [s.path for s in sources if s.checkpoint is not None] + [chosen]
    for folder in models:
        if not _has_tokenizer(folder):
            continue  # mergekit assumes the base model's tokenizer
        size = _rows(folder) or rows
        theirs = {tok: i for tok, i in _vocab(folder).items() if i < size}
        for tok, i in sorted(out.items(), key=lambda item: item[1]):  # the first mismatch by id
            if theirs.get(tok) != i:
                raise PeftmergeError(f"{where}: token {tok!r} is id {i} in the output vocabulary but "
                                     f"{theirs.get(tok)} in {folder}; mergekit would re-map the embeddings, peftmerge "
                                     "does not: merge models that share a vocabulary, or use mergekit-yaml")
    return None if chosen.resolve() == base.resolve() else chosen


def copy_tokenizer(folder: Path | None, base: Path, out: Path) -> None:
    """Replace the tokenizer files copied from ``base`` into ``out`` (this run's folder) by ``folder``'s."""
    if folder is None:
        return
    for f in out.iterdir():
        if f.is_file() and TOKENIZER_FILES.match(f.name):
            f.unlink()
    for f in sorted(folder.iterdir()):
        if f.is_file() and TOKENIZER_FILES.match(f.name):
            shutil.copyfile(f, out / f.name)
