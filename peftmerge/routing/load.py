"""Load what a router needs: adapter metadata, the base model, the query embedder, the routed model."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import PeftmergeError
from ..io.meta import read_meta
from ..io.adapter import LoraAdapter, load_adapter
from ..io import model_loader
from ..io.base_model import check_same_base
from ..io.checkpoint import refuse_pickle_weights
from ..io.gguf import loadable
from ..io.heads import head_state
from .embed import Embedder, as_query, read_queries, record_query
from .router import AdapterInfo, Router


def adapter_meta(adapter: LoraAdapter) -> dict:
    """The adapter folder's ``peftmerge.json`` (written by ``peftmerge train``), or {} when absent."""
    return read_meta(adapter.path)


def adapter_info(adapter: LoraAdapter) -> AdapterInfo:
    meta = adapter_meta(adapter)
    shape = meta.get("shape") or ("classify" if adapter.config.get("task_type") == "SEQ_CLS" else "text2text")
    if shape not in ("text2text", "classify"):
        raise PeftmergeError(f"{adapter.path}: peftmerge.json shape {shape!r} is not text2text or classify")
    template = meta.get("template") if isinstance(meta.get("template"), str) else None
    return AdapterInfo(adapter.task, str(adapter.path.resolve()), shape, meta.get("labels"), template)


def base_model_of(adapters: list[LoraAdapter], override: str | None) -> str:
    """The base model all adapters were trained on (``--model`` wins): its Hub repo id where known."""
    if override:
        return str(override)
    found = [(a.path, adapter_meta(a).get("base_model") or a.base_model) for a in adapters]
    base = check_same_base(found)
    if not base:
        raise PeftmergeError("no adapter records its base model (peftmerge.json base_model or adapter_config "
                             "base_model_name_or_path); pass --model PATH")
    return base


def examples_of(adapters: list[LoraAdapter], files: dict[str, str] | None, limit: int = 1000) -> dict[str, list]:
    """Each task's example inputs (at most ``limit``): ``samples`` of its peftmerge.json plus ``files``
    {task: JSONL}; a sentence pair is kept as a ``(text, text_pair)`` pair."""
    files = dict(files or {})
    tasks = [a.task for a in adapters]
    unknown = [t for t in files if t not in tasks]
    if unknown:
        raise PeftmergeError(f"--examples {unknown[0]}=...: no adapter has task {unknown[0]!r}; "
                             f"the tasks are: {', '.join(tasks)}")
    out = {}
    for a in adapters:
        texts = [as_query(s) for s in adapter_meta(a).get("samples") or []]
        if a.task in files:
            texts += [record_query(r) for r in read_queries(files[a.task])]
        out[a.task] = texts[:limit]
    return out


def open_adapters(paths: list, alpha: float | None = None) -> list[LoraAdapter]:
    if not paths:
        raise PeftmergeError("no adapters given; pass two or more adapter folders")
    adapters = [load_adapter(p, alpha) for p in paths]
    seen: dict[str, Path] = {}
    for a in adapters:
        if a.task in seen:
            raise PeftmergeError(f"{a.path} and {seen[a.task]} have the same task name {a.task!r}; give each "
                                 "adapter its own task (peftmerge.json task, or the folder name)")
        seen[a.task] = a.path
    return adapters


def _cannot_load(path, what: str, e: Exception) -> PeftmergeError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return PeftmergeError(f"{path}: cannot load the {what} ({first[:200]}); pass a local model folder, a .gguf file "
                          "or a Hub id in the local cache")


def load_base(path: str, classify: bool = False, num_labels: int = 2):
    """(model, tokenizer) from a local folder, a ``.gguf`` file or a Hub id (:mod:`peftmerge.io.model_loader`),
    float32, eval mode."""
    src, gguf = model_loader.resolve(path)
    tokenizer = model_loader.load_tokenizer(src, gguf)
    model = model_loader.load_model(src, gguf, "classify" if classify else "text2text",
                                    num_labels=num_labels if classify else None, pad_token_id=tokenizer.pad_token_id)
    return model.eval(), tokenizer


def load_embedder(path: str | None, base=None, base_tokenizer=None, layer: int = -1, pairs: str = "joint") -> Embedder:
    """The query embedder: a sentence-embedding or language model (a local folder, a ``.gguf`` file or a folder
    holding one, a Hub id in the local cache), or the base model."""
    if path is None:
        return Embedder(base, base_tokenizer, layer, pairs=pairs)
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from ..io.model_loader import quiet_report

    refuse_pickle_weights(path)
    try:
        src = loadable(path)
        config = AutoConfig.from_pretrained(src)
        n_layers = config.num_hidden_layers
        if layer < -1 or layer > n_layers:
            raise PeftmergeError(f"layer {layer} is out of range for the {n_layers}-layer embedder {path}; pick "
                                 f"0..{n_layers} or -1")
        # layers above ``layer`` are never run, so they are not loaded either (layer 0: the embeddings and
        # one layer, whose input is the pooled state)
        kw = {"num_hidden_layers": layer + 1} if 0 <= layer < n_layers - 1 else {}
        with quiet_report():  # the weights of the layers left out are reported as unused
            model = AutoModel.from_pretrained(src, dtype=torch.float32, **kw).eval()
        tokenizer = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise _cannot_load(path, "embedding model", e) from None
    return Embedder(model, tokenizer, layer, pairs=pairs)


def head_tensors(adapter: LoraAdapter) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """{module: (weight, bias)} of an adapter's task head (its modules_to_save, or heads/<task>)."""
    out: dict[str, dict] = {}
    for key, value in head_state(adapter).items():
        module, _, param = key.rpartition(".")
        out.setdefault(module, {})[param] = value.float()
    return {m: (p["weight"], p.get("bias")) for m, p in out.items() if "weight" in p}


def open_routed(router: Router, model: str | None = None):
    """(RoutedModel, tokenizer) for ``router``: base model + the router's adapters patched in."""
    from .apply import RoutedModel

    classify = {a.shape for a in router.adapters} == {"classify"}
    if len({a.shape for a in router.adapters}) > 1:
        raise PeftmergeError("the router mixes classification and text-to-text adapters; route one kind at a time")
    adapters = [load_adapter(a.path) for a in router.adapters]
    heads = [head_tensors(a) for a in adapters] if classify else None
    labels = [len(a.labels) for a in router.adapters if a.labels]
    labels += [w.shape[0] for h in heads or [] for w, _ in h.values()]
    base = model or router.base_model
    if not base:
        raise PeftmergeError("the router records no base model; pass --model PATH")
    base_model, tokenizer = load_base(base, classify, max(labels, default=2))
    general = [load_adapter(p) for p in router.general]
    arrow = router.tensors if router.spec.per_token else None
    return RoutedModel(base_model, adapters, arrow=arrow, general=general, heads=heads), tokenizer
