"""Python API twins of the CLI: ``route_build``, ``predict``, ``route_eval``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import PeftmergeError
from ..io.atomic import atomic_file, check_output
from . import registry, serving
from .decide import Decision, decide
from .embed import encode, query_text, read_queries, record_query
from .load import (adapter_info, base_model_of, examples_of, load_base, load_embedder, open_adapters,
                   open_routed)
from .registry import BuildContext
from .router import Router, load_router


def _pairs(router) -> str:
    """How the router embeds sentence pairs (routers built before the ``pairs`` parameter: ``joint``)."""
    return router.params.get("pairs", "joint")


def route_build(adapters: list, out, strategy: str = "centroid", *, top_k: int | None = None,
                temperature: float | None = None, abstain: float | None = None, layer: int | None = None,
                examples: dict[str, str] | None = None, general: list | None = None, embedder: str | None = None,
                model: str | None = None, params: dict | None = None, max_examples: int = 1000,
                overwrite: bool = False) -> Router:
    """Build a router over ``adapters`` (folders) with ``strategy`` and save it to ``out``; query routers
    use at most ``max_examples`` example inputs per adapter (stored samples first, then ``examples`` files)."""
    spec = registry.get(strategy)
    embedder = str(embedder) if embedder else None
    model = str(model) if model else None
    given = {"top_k": top_k, "temperature": temperature, "abstain": abstain, "layer": layer, **(params or {})}
    resolved = spec.resolve(given)
    _positive("max_examples", max_examples)
    used = [*adapters, *(general or []), *(examples or {}).values(), embedder, model]
    check_output(out, [Path(p) for p in used if p], overwrite)
    opened = open_adapters(adapters)
    gen = open_adapters(general) if general else []
    if gen and strategy != "arrow":
        raise PeftmergeError("--general (GenKnowSub) applies to the arrow router only")
    base = base_model_of(opened, model)
    ctx = BuildContext(opened, [a.task for a in opened], general=gen)
    if not spec.per_token:
        ctx.examples = examples_of(opened, examples, max_examples)
        for task, texts in ctx.examples.items():  # before loading any model: fail fast
            if not texts:
                raise PeftmergeError(f"adapter {task!r} has no example inputs; add samples to its peftmerge.json "
                                     f"or pass --examples {task}=FILE.jsonl")
        base_model, tokenizer = (None, None) if embedder else load_base(base)
        ctx.embed = load_embedder(embedder, base_model, tokenizer, resolved["layer"], resolved["pairs"])
    elif examples:
        raise PeftmergeError("the arrow router is data-free; --examples applies to centroid and probe")
    tensors = spec.build(ctx, resolved)
    router = Router(strategy, resolved, [adapter_info(a) for a in opened], base, tensors, embedder,
                    [str(g.path.resolve()) for g in gen])
    router.save(out, overwrite)
    return router


def _positive(name: str, value, optional: bool = False) -> None:
    """A count option (``--limit``, ``--batch-size``...): a whole number >= 1 (or None where ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PeftmergeError(f"--{name.replace('_', '-')} {value!r} must be a whole number >= 1")


def _as_router(router) -> Router:
    return router if isinstance(router, Router) else load_router(router)


def route_queries(router: Router, texts: list, routed=None, tokenizer=None, embed=None,
                  batch_size: int = 16) -> Decision:
    """The router's decision for each query (a string or a ``(text, text_pair)`` pair; arrow: each adapter's
    mean weight over layers and tokens)."""
    if router.spec.per_token:
        p = router.params
        shares = []
        for i in range(0, len(texts), batch_size):
            enc = encode(tokenizer, texts[i:i + batch_size])
            plan = routed.arrow_plan(p["top_k"], p["temperature"], stats_for=enc["attention_mask"])
            with torch.no_grad():
                routed(enc["input_ids"], enc["attention_mask"], plan=plan)
            shares.append(plan.stats / plan.stats.sum(1, keepdim=True).clamp(min=1e-12))
        share = torch.cat(shares)
        top, idx = share.topk(min(int(p["top_k"]), share.shape[1]), dim=1)
        return Decision(idx, top / top.sum(1, keepdim=True).clamp(min=1e-12),
                        torch.zeros(len(texts), dtype=torch.bool), top[:, 0])
    if embed is None:
        embed = load_embedder(router.embedder, routed.model if routed else None, tokenizer, router.params["layer"],
                              _pairs(router))
    scores, confidence = router.scores(embed(texts))
    p = router.params
    return decide(scores, confidence, p["top_k"], p["temperature"], p.get("abstain"))


def _prompt(rec: dict, info=None) -> str | tuple[str, str]:
    """What the model reads: the routed adapter's training template filled in exactly as ``peftmerge eval``
    fills it (``{task}``, ``{labels}`` and the record's fields), else the query itself (a pair stays a pair)."""
    if info is not None and info.template:
        from ..data.tasks import Task
        from ..data.prompts import prompt_of

        return prompt_of(Task(info.task, Path(info.path), [rec], info.labels, info.template, {"task": info.task}), rec)
    query = record_query(rec)
    return query if rec.get("text") is not None else query_text(query)


def _write_jsonl(rows: list[dict], out: Path, overwrite: bool) -> None:
    with atomic_file(out, overwrite) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _open(router: Router, model: str | None, mode: str | None):
    """(routed model, tokenizer, embedder, mode) for answering queries with ``router``."""
    if mode is None:
        mode = "arrow" if router.spec.per_token else ("select" if router.params["top_k"] == 1 else "mixture")
    if (mode == "arrow") != router.spec.per_token:
        raise PeftmergeError(f"mode {mode!r} does not fit a {router.strategy} router; use "
                             + ("arrow" if router.spec.per_token else "select, mixture or fuse"))
    routed, tokenizer = open_routed(router, model)
    tokenizer.padding_side = "right" if router.adapters[0].shape == "classify" else "left"
    embed = None if router.spec.per_token else load_embedder(router.embedder, routed.model, tokenizer,
                                                             router.params["layer"], _pairs(router))
    return routed, tokenizer, embed, mode


def _answer(router: Router, records: list[dict], routed, tokenizer, embed, mode: str, *, route_only: bool = False,
            max_new_tokens: int = 32, batch_size: int = 8, progress: bool = True) -> list[dict]:
    """One record per query: ``adapters``/``weights``, ``abstained``, and ``label`` or ``output``."""
    classify = router.adapters[0].shape == "classify"
    rows = []
    for i in tqdm(range(0, len(records), batch_size), disable=not progress, desc="predict"):
        batch = records[i:i + batch_size]
        queries = [record_query(r) for r in batch]
        decision = route_queries(router, queries, routed, tokenizer, embed)
        chosen = decision.rows()
        for c in chosen:
            rows.append({"adapters": [router.tasks[e] for e, _ in c], "weights": [round(w, 6) for _, w in c],
                         "abstained": not c})
        if route_only:
            continue
        prompts = [_prompt(r, router.adapters[c[0][0]] if c else None) for r, c in zip(batch, chosen)]
        enc = encode(tokenizer, prompts)
        plan = routed.arrow_plan(router.params["top_k"], router.params["temperature"]) if mode == "arrow" else None
        dec = None if mode == "arrow" else decision
        with torch.no_grad():
            if classify:
                logits = routed(enc["input_ids"], enc["attention_mask"], decision=dec, mode=mode, plan=plan).logits
                for row, lg, c in zip(rows[-len(batch):], logits, chosen):
                    labels = router.adapters[c[0][0]].labels if c else None
                    k = int(torch.isfinite(lg).sum())
                    best = int(lg[:k].argmax())
                    row["label"] = labels[best] if labels and best < len(labels) else best
            else:
                seqs = routed.generate(enc["input_ids"], enc["attention_mask"], decision=dec, mode=mode, plan=plan,
                                       max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)
                texts_out = tokenizer.batch_decode(seqs[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                for row, t in zip(rows[-len(batch):], texts_out):
                    row["output"] = t
    for n, (rec, row) in enumerate(zip(records, rows)):
        query = record_query(rec)
        ordered = {"id": rec.get("id", n), "text": list(query) if isinstance(query, tuple) else query}
        ordered.update(row)
        row.clear()
        row.update(ordered)
    return rows


EMIT = ("answers", "adapter", "names")


def predict(router, input, out, *, model: str | None = None, mode: str | None = None, route_only: bool = False,
            max_new_tokens: int = 32, batch_size: int = 8, emit: str = "answers", per_query: bool = False,
            overwrite: bool = False, progress: bool = True):
    """Route each query of ``input`` (JSONL) and answer it; write ``out`` (JSONL), one record per query: ``id``
    (the query's own, else its line number from 0), ``text`` (the query), ``adapters``/``weights`` (the
    routing), ``abstained``, and ``label`` (classification) or ``output``.

    ``emit="adapter"``: route only, and give each record ``adapter``, the name a serving engine should be asked
    for (:mod:`.serving`; None: the base model); ``emit="names"``: ``out`` is plain text, that name per line
    (an empty line: the base model). An arrow router needs ``per_query`` there (its per-query form)."""
    if emit not in EMIT:
        raise PeftmergeError(f"--emit {emit!r} is not one of {', '.join(EMIT)}")
    if emit == "answers" and per_query:
        raise PeftmergeError("--per-query names adapters for a serving engine; use it with --emit adapter or names")
    if emit != "answers" and mode is not None:
        raise PeftmergeError(f"--mode applies to answers; --emit {emit} only routes (an engine applies the top-1 "
                             "adapter): drop --mode")
    _positive("max_new_tokens", max_new_tokens)
    _positive("batch_size", batch_size)
    out = Path(out)
    check_output(out, [Path(p) for p in (input, router if not isinstance(router, Router) else router.path, model)
                       if p], overwrite, folder=False)
    router = _as_router(router)
    if emit != "answers":
        serving.check(router, per_query)
    records = read_queries(input)
    if emit != "answers":
        rows = _engine_rows(router, records, model, batch_size, progress)
        if emit == "names":
            with atomic_file(out, overwrite) as tmp:
                tmp.write_text("".join(f"{r['adapter'] or ''}\n" for r in rows), encoding="utf-8")
        else:
            _write_jsonl(rows, out, overwrite)
        return rows
    routed, tokenizer, embed, mode = _open(router, model, mode)
    rows = _answer(router, records, routed, tokenizer, embed, mode, route_only=route_only,
                   max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    _write_jsonl(rows, out, overwrite)
    return rows


def _routing_inputs(router: Router, model: str | None):
    """(routed model, tokenizer, embedder): what :func:`route_queries` needs, and no more (a query router with its
    own embedder loads no base model)."""
    if router.spec.per_token:
        routed, tokenizer = open_routed(router, model)
        return routed, tokenizer, None
    if router.embedder:
        return None, None, load_embedder(router.embedder, layer=router.params["layer"], pairs=_pairs(router))
    base, tokenizer = load_base(model or router.base_model)
    return None, tokenizer, load_embedder(None, base, tokenizer, router.params["layer"], _pairs(router))


def engine_router(router, *, model: str | None = None, per_query: bool = False, batch_size: int = 16):
    """A function ``queries -> names``: per query (a string or a ``(text, text_pair)`` pair), the adapter a serving
    engine should be asked for (None: the base model), as ``predict --emit names`` gives it; what routing needs is
    loaded once, here (a router in front of an engine calls the function per request or batch)."""
    router = _as_router(router)
    serving.check(router, per_query)
    _positive("batch_size", batch_size)
    routed, tokenizer, embed = _routing_inputs(router, model)

    def names(queries: list) -> list[str | None]:
        return serving.engine_names(router, route_queries(router, list(queries), routed, tokenizer, embed,
                                                          batch_size))

    return names


def _engine_rows(router: Router, records: list[dict], model: str | None, batch_size: int,
                 progress: bool) -> list[dict]:
    """One record per query: ``id``, ``text``, the routing and ``adapter`` (the name to ask an engine for)."""
    routed, tokenizer, embed = _routing_inputs(router, model)
    rows = []
    for i in tqdm(range(0, len(records), batch_size), disable=not progress, desc="route"):
        batch = records[i:i + batch_size]
        queries = [record_query(r) for r in batch]
        decision = route_queries(router, queries, routed, tokenizer, embed, batch_size)
        for n, (query, c, name) in enumerate(zip(queries, decision.rows(), serving.engine_names(router, decision))):
            rows.append({"id": batch[n].get("id", i + n), "text": list(query) if isinstance(query, tuple) else query,
                         "adapters": [router.tasks[e] for e, _ in c], "weights": [round(w, 6) for _, w in c],
                         "abstained": not c, "adapter": name})
    return rows


def _as_label(text: str, labels: list[str] | None) -> str:
    """A generated answer as a label word: the label it starts with (case-insensitive), else the text."""
    answer = text.strip().split("\n")[0].strip()
    for label in sorted(labels or [], key=len, reverse=True):
        if answer.lower().startswith(label.lower()):
            return label
    return answer


class _Fixed:
    """The routed model with one decision for every row (or Arrow's per-token plan), called like a model."""

    def __init__(self, routed, router: Router, mode: str, adapter: int | None):
        self.routed, self.router, self.mode, self.adapter = routed, router, mode, adapter

    def __call__(self, input_ids, attention_mask=None):
        n = input_ids.shape[0]
        if self.mode == "arrow":
            plan = self.routed.arrow_plan(self.router.params["top_k"], self.router.params["temperature"])
            return self.routed(input_ids, attention_mask, plan=plan)
        none = self.adapter is None
        dec = Decision(torch.full((n, 1), 0 if none else self.adapter), torch.full((n, 1), 0.0 if none else 1.0),
                       torch.full((n,), none), torch.ones(n))
        return self.routed(input_ids, attention_mask, decision=dec, mode="select")


def _label_words_routed(router: Router, task, routed, tokenizer, embed, mode: str, batch_size: int,
                        progress: bool) -> list[str]:
    """Label-word tasks on text-to-text adapters: each query is answered by its routed adapter as that
    adapter was trained and as ``peftmerge eval --adapter`` scores it: the adapter's template (its task
    name and label words) and constrained scoring of its label words (abstaining rows: the base model on
    the task's own prompt). A misrouted query thus answers from another task's label set."""
    from dataclasses import replace

    from ..data.predict import predict_label_words

    decision = route_queries(router, [record_query(r) for r in task.rows], routed, tokenizer, embed)
    top = [None if a else int(i) for i, a in zip(decision.indices[:, 0], decision.abstained)]
    out: list[str | None] = [None] * len(task.rows)
    for e in sorted(set(top), key=lambda v: -1 if v is None else v):
        rows = [j for j, t in enumerate(top) if t == e]
        info = router.adapters[e] if e is not None else None
        sub = replace(task, rows=[task.rows[j] for j in rows])
        if info is not None and info.labels:
            sub = replace(sub, labels=list(info.labels), template=info.template, meta={**task.meta, "task": info.task})
        preds = predict_label_words(_Fixed(routed, router, mode, e), tokenizer, sub, batch_size=batch_size,
                                    progress=progress)
        for j, p in zip(rows, preds):
            out[j] = p
    return out


def predict_for_eval(router_dir, base: str | None, task, *, batch_size: int = 8, max_length: int | None = None,
                     progress: bool = True) -> list[str]:
    """``peftmerge eval --router``: the routed answer (label word or text) for each row of ``task``."""
    router = _as_router(router_dir)
    routed, tokenizer, embed, mode = _open(router, base, None)
    if task.labels and router.adapters[0].shape == "text2text":
        return _label_words_routed(router, task, routed, tokenizer, embed, mode, batch_size, progress)
    rows = _answer(router, task.rows, routed, tokenizer, embed, mode, batch_size=batch_size, progress=progress,
                   max_new_tokens=8 if task.labels else 128)
    if task.labels:
        return [str(r["label"]) if "label" in r else _as_label(r.get("output", ""), task.labels) for r in rows]
    return [r.get("output", "") for r in rows]


def route_eval(router, data: dict[str, str], *, model: str | None = None, limit: int | None = None,
               batch_size: int = 16, progress: bool = True, out: str | Path | None = None,
               overwrite: bool = False) -> dict:
    """Routing accuracy: the share of each task's queries whose top-1 adapter is that task's (written to ``out``
    as JSON too, when given)."""
    _positive("limit", limit, optional=True)
    _positive("batch_size", batch_size)
    if out is not None:
        out = check_output(out, [Path(p) for p in (*data.values(), model,
                                                   router if not isinstance(router, Router) else router.path) if p],
                           overwrite, folder=False)
    router = _as_router(router)
    unknown = [t for t in data if t not in router.tasks]
    if unknown:
        raise PeftmergeError(f"--data {unknown[0]}=...: the router has no adapter for task {unknown[0]!r}; "
                             f"its tasks are: {', '.join(router.tasks)}")
    queries = {t: [record_query(r) for r in read_queries(f)][:limit] for t, f in data.items()}
    routed, tokenizer, embed = _routing_inputs(router, model)
    report = {"strategy": router.strategy, "tasks": {}, "confusion": {}}
    correct = total = 0
    for task, texts in tqdm(queries.items(), disable=not progress, desc="route eval"):
        decision = route_queries(router, texts, routed, tokenizer, embed, batch_size)
        top1 = [router.tasks[int(i)] if not a else None for i, a in zip(decision.indices[:, 0], decision.abstained)]
        hits = sum(t == task for t in top1)
        report["tasks"][task] = {"accuracy": hits / len(texts), "n": len(texts),
                                 "abstained": int(decision.abstained.sum())}
        report["confusion"][task] = {str(t): top1.count(t) for t in sorted(set(top1), key=str)}
        correct, total = correct + hits, total + len(texts)
    report["accuracy"] = correct / total
    if out is not None:
        with atomic_file(out, overwrite) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    return report
