"""Model cards (README.md with YAML metadata) for everything peftmerge writes.

Built with huggingface_hub's ``ModelCard`` / ``ModelCardData`` so the Hub reads the metadata
(``base_model``, ``base_model_relation``, ``library_name``, tags, datasets) and the body carries the
recipe that made the output (method, parameters, inputs with their revision or sha256, peftmerge
version) and, when an eval was run, a results table.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from ..errors import PeftmergeError
from ..version import __version__
from .hub import repo_id_of

KINDS = ("adapter", "merged-adapter", "merged-model", "router")
RESULTS_FILE = "results.json"
REPO_PLACEHOLDER = "REPO_ID"  # in the usage snippet until the card is pushed (push fills in the repo id)

_USAGE = {
    "adapter": (
        "from transformers import AutoModelForCausalLM\nfrom peft import PeftModel\n\n"
        'base = AutoModelForCausalLM.from_pretrained("{base}")\nmodel = PeftModel.from_pretrained(base, "{repo}")'
    ),
    "merged-model": 'from transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained("{repo}")',
    "router": ("hf download {repo} --local-dir router\n"
               "peftmerge predict --router router --input queries.jsonl -o predictions.jsonl\n"
               "peftmerge route eval --router router --data TASK=queries.jsonl"),
}
_USAGE["merged-adapter"] = _USAGE["adapter"]
_CLASSIFIER_USAGE = {  # adapters with a classification head (task_type SEQ_CLS)
    "adapter": (
        "from transformers import AutoModelForSequenceClassification\nfrom peft import PeftModel\n\n"
        'base = AutoModelForSequenceClassification.from_pretrained("{base}", num_labels={labels})\n'
        'model = PeftModel.from_pretrained(base, "{repo}")'
    ),
    "merged-adapter": (
        "from huggingface_hub import snapshot_download\nfrom transformers import AutoModelForSequenceClassification\n"
        "from peftmerge.io.heads import load_merged\n\n"
        "# one head per task ({tasks}): load the merged LoRA with the head of the task you want\n"
        'base = AutoModelForSequenceClassification.from_pretrained("{base}", num_labels={labels})\n'
        'model = load_merged(base, snapshot_download("{repo}"), "{task}")'
    ),
}


def normalize_results(results: dict | None, source: str = "results") -> dict[str, dict] | None:
    """Accept ``{"tasks": {task: {metric: value}}}`` (the eval command's ``results.json``) or a plain
    ``{task: {metric: value}}``; return the plain form, or raise one clear line naming ``source``."""
    if results is None:
        return None
    if isinstance(results, dict) and isinstance(results.get("tasks"), dict):
        results = results["tasks"]
    if not isinstance(results, dict) or not all(isinstance(r, dict) for r in results.values()):
        raise PeftmergeError(
            f"{source}: results must be {{task: {{metric: value}}}} or {{\"tasks\": {{task: {{metric: value}}}}}}; "
            "re-run the eval command or fix the file"
        )
    return {str(t): dict(r) for t, r in results.items()} or None


def load_results(path: str | Path) -> dict[str, dict] | None:
    """Read a ``results.json`` written by the eval command (``None`` if the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PeftmergeError(f"{path}: not valid JSON ({e.msg}); re-run the eval command or delete the file") from None
    return normalize_results(data, source=str(path))


def _cell(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v if v is not None else "")


def _results_table(results: dict[str, dict]) -> str:
    """``{task: {metric: value}}`` -> a markdown table, one row per task, one column per metric."""
    metrics = sorted({m for r in results.values() for m in r})
    rows = ["| task | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for task, r in results.items():
        rows.append(f"| {task} | " + " | ".join(_cell(r.get(m)) for m in metrics) + " |")
    return "\n".join(rows)


def _inputs_table(inputs: list, weights: list | None = None) -> str | None:
    """Recipe inputs (dicts with ``source`` and ``revision`` or ``sha256``, or plain strings) -> a table; an
    input's weight is its own ``weight``, else the recipe's ``weights`` at its position."""
    rows = []
    for k, i in enumerate(inputs):
        weight = weights[k] if isinstance(weights, list) and k < len(weights) else ""
        if isinstance(i, dict):
            pin = f"revision `{i['revision']}`" if i.get("revision") else (f"sha256 `{i['sha256']}`" if i.get("sha256") else "")
            rows.append(f"| `{i.get('source', i.get('path', '?'))}` | {i.get('weight', weight)} | {pin} |")
        else:
            rows.append(f"| `{i}` | {weight} |  |")
    if not rows:
        return None
    return "\n".join(["| input | weight | pinned by |", "|---|---|---|", *rows])


def make_card(
    *,
    kind: str,
    base_model: str | list[str] | None,
    recipe: dict | None = None,
    results: dict | None = None,
    tags: list[str] | tuple[str, ...] = (),
    datasets: list[str] | tuple[str, ...] = (),
    title: str | None = None,
    repo_id: str | None = None,
    heads: dict[str, int] | None = None,
) -> ModelCard:
    """A model card for an output of ``kind`` (one of :data:`KINDS`).

    ``recipe`` is stored in full (JSON) with ``peftmerge_version`` added; its ``method`` becomes a tag
    and its ``inputs`` a table. ``results`` is ``{task: {metric: value}}`` (or the eval command's
    ``{"tasks": ...}``). ``repo_id`` only fills the usage snippet. ``heads`` ({task: number of labels}) marks
    a classification adapter: the snippet loads it on a sequence classifier (with that task's head).
    """
    if kind not in KINDS:
        raise PeftmergeError(f"unknown output kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    results = normalize_results(results)
    recipe = dict(recipe or {})
    recipe.setdefault("peftmerge_version", __version__)
    is_adapter = kind in ("adapter", "merged-adapter")
    method = recipe.get("method")

    all_tags = ["peftmerge"]
    if kind.startswith("merged"):
        all_tags.append("merge")
    all_tags.append("lora")
    if kind == "router":
        all_tags.append("router")
    if method:
        all_tags.append(str(method))
    all_tags += [t for t in tags if t not in all_tags]

    bases = ([base_model] if isinstance(base_model, str) else list(base_model)) if base_model else []
    hub_bases = [h for b in bases if (h := repo_id_of(b))]  # the Hub's metadata takes repo ids, not local paths
    relation = None
    if hub_bases:
        relation = "merge" if kind.startswith("merged") else "adapter"
    data = ModelCardData(
        base_model=(hub_bases[0] if isinstance(base_model, str) else hub_bases) if hub_bases else None,
        base_model_relation=relation,
        library_name="peft" if is_adapter else ("transformers" if kind == "merged-model" else None),
        tags=all_tags,
        datasets=list(datasets) or None,
    )

    lines = [f"# {title or kind.replace('-', ' ').capitalize()}", ""]
    what = {
        "adapter": "A LoRA adapter",
        "merged-adapter": f"A LoRA adapter merged from several adapters{f' with `{method}`' if method else ''}",
        "merged-model": f"A full model: LoRA adapters merged into the base weights{f' with `{method}`' if method else ''}",
        "router": "A router that sends each query to one of several LoRA adapters",
    }[kind]
    lines.append(f"{what}, made with [peftmerge](https://github.com/peftmerge/peftmerge) {__version__}.")
    if bases:
        lines.append("Base model: " + ", ".join(f"`{b}`" for b in bases) + ".")
        if len(hub_bases) < len(bases):
            lines.append("(A local path is named here only: the metadata's `base_model` takes Hub repo ids.)")
    base0 = base_model if isinstance(base_model, str) else (base_model[0] if base_model else "BASE_MODEL")
    usage = _CLASSIFIER_USAGE[kind] if heads and kind in _CLASSIFIER_USAGE else _USAGE[kind]
    task, labels = next(iter((heads or {"": 0}).items()))
    lines += ["", "## Usage", "", "```python" if kind != "router" else "```bash",
              usage.format(base=base0, repo=repo_id or REPO_PLACEHOLDER, task=task, labels=labels,
                           tasks=", ".join(heads or ())), "```"]
    inputs = recipe.get("inputs")
    if isinstance(inputs, list) and (table := _inputs_table(inputs, recipe.get("weights"))):
        lines += ["", "## Inputs", "", table]
    lines += ["", "## Recipe", "", "```json", json.dumps(recipe, indent=2, sort_keys=True, default=str), "```"]
    if results:
        lines += ["", "## Results", "", _results_table(results)]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def with_results(card: ModelCard, results: dict) -> ModelCard:
    """``card`` with its ``## Results`` section replaced (or appended) by a table of ``results``.

    For an output whose card was written before the eval ran (``results.json`` came later)."""
    results = normalize_results(results)
    text = card.content.rstrip("\n")
    head, sep, tail = text.partition("\n## Results\n")
    rest = ""
    if sep:
        nxt = tail.find("\n## ")
        rest = tail[nxt:] if nxt >= 0 else ""
    new = head.rstrip("\n") + ("\n\n## Results\n\n" + _results_table(results) if results else "") + rest
    return ModelCard(new + "\n")


def classifier_heads(folder: Path) -> dict[str, int] | None:
    """{task: number of labels} of a classification adapter folder (task_type SEQ_CLS), else None: each head's
    output size is the smallest first dimension among its 2-D weights (BERT's classifier, RoBERTa's out_proj)."""
    from .safetensors_file import read_header

    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        meta = json.loads((folder / "peftmerge.json").read_text()) if (folder / "peftmerge.json").exists() else {}
    except (OSError, json.JSONDecodeError):
        return None
    if config.get("task_type") != "SEQ_CLS":
        return None
    files = {t: folder / f for t, f in meta.get("heads", {}).items()} or {meta.get("task", "TASK"):
                                                                        folder / "adapter_model.safetensors"}
    out = {}
    for task, path in files.items():
        if not path.exists():
            return None
        header = read_header(path)
        sizes = [v["shape"][0] for k, v in header.items() if k.endswith("weight") and len(v.get("shape", ())) == 2
                 and not any(x in k for x in ("lora_", "base_layer"))]
        out[task] = min(sizes) if sizes else 0
    return out if all(out.values()) else None


def write_card(out_dir: str | Path, **kwargs) -> Path:
    """Write ``README.md`` into ``out_dir``; see :func:`make_card` for the arguments.

    Without ``results=``, a ``results.json`` already in ``out_dir`` (written by the eval command) is used.
    """
    out_dir = Path(out_dir)
    if kwargs.get("results") is None:
        kwargs["results"] = load_results(out_dir / RESULTS_FILE)
    if kwargs.get("heads") is None and kwargs.get("kind") in _CLASSIFIER_USAGE:
        kwargs["heads"] = classifier_heads(out_dir)
    path = out_dir / "README.md"
    make_card(**kwargs).save(path)
    return path
