"""Model cards (README.md with YAML metadata) for everything peftmerge writes.

Built with huggingface_hub's ``ModelCard`` / ``ModelCardData`` so the Hub reads the metadata
(``base_model``, ``base_model_relation``, ``library_name``, tags) and the recipe that made the output.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from . import __version__

KINDS = ("adapter", "merged-adapter", "merged-model", "router")


def _results_table(results: dict) -> str:
    """``{task: {metric: value}}`` -> a markdown table."""
    metrics = sorted({m for r in results.values() for m in r})
    rows = ["| task | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for task, r in results.items():
        cells = [f"{r[m]:.4f}" if isinstance(r.get(m), float) else str(r.get(m, "")) for m in metrics]
        rows.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def make_card(
    *,
    kind: str,
    base_model: str | None,
    recipe: dict | None = None,
    results: dict | None = None,
    tags: list[str] | tuple[str, ...] = (),
    datasets: list[str] | tuple[str, ...] = (),
    title: str | None = None,
) -> ModelCard:
    """A model card for an output of ``kind`` (one of :data:`KINDS`)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    is_adapter = kind in ("adapter", "merged-adapter")
    method = (recipe or {}).get("method")
    all_tags = ["peftmerge"] + (["lora"] if is_adapter or kind == "merged-model" else [])
    if kind.startswith("merged"):
        all_tags.append("merge")
    if method:
        all_tags.append(str(method))
    all_tags += [t for t in tags if t not in all_tags]
    data = ModelCardData(
        base_model=base_model or None,
        base_model_relation=("merge" if kind.startswith("merged") else "adapter") if base_model else None,
        library_name="peft" if is_adapter else ("transformers" if kind == "merged-model" else None),
        tags=all_tags,
        datasets=list(datasets) or None,
    )
    lines = [f"# {title or kind.replace('-', ' ').capitalize()}", ""]
    lines.append(f"Made with [peftmerge](https://github.com/peftmerge/peftmerge) {__version__}.")
    if base_model:
        lines.append(f"Base model: `{base_model}`.")
    if recipe:
        lines += ["", "## Recipe", "", "```json", json.dumps(recipe, indent=2, sort_keys=True, default=str), "```"]
    if results:
        lines += ["", "## Results", "", _results_table(results)]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def write_card(out_dir: str | Path, **kwargs) -> Path:
    """Write ``README.md`` into ``out_dir``; see :func:`make_card` for the arguments."""
    path = Path(out_dir) / "README.md"
    make_card(**kwargs).save(path)
    return path
