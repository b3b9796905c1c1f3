"""``peftmerge predict``: route each query and answer it (a thin layer over
:func:`peftmerge.routing.api.predict`)."""

from __future__ import annotations

import click

from .common import Command, common_options, is_quiet, show_progress


@click.command("predict", cls=Command)
@click.option("--router", "router", required=True, type=click.Path(), help="Router folder (`peftmerge route build`).")
@click.option("--input", "input_", required=True, type=click.Path(), help="Queries, JSONL (text / instruction).")
@click.option("-o", "--out", required=True, type=click.Path(), help="Predictions JSONL (one record per query).")
@click.option("--model", default=None, help="Base model path (default: the router's).")
@click.option("--mode", type=click.Choice(["select", "mixture", "fuse", "arrow"]), default=None,
              help="How the chosen adapters are applied (default: select for top-1, mixture otherwise; arrow).")
@click.option("--route-only", is_flag=True, help="Only record the routing, do not run the routed model.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True, help="Generation length.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Queries per mixed batch.")
@click.option("--emit", type=click.Choice(["answers", "adapter", "names"]), default="answers", show_default=True,
              help="answers: route and answer; adapter: route only, each record gets `adapter`, the name to ask a "
                   "serving engine (vLLM, SGLang, LoRAX, TGI) for; names: OUT is plain text, that name per line "
                   "(empty: the base model). See docs/serving.md.")
@click.option("--per-query", is_flag=True,
              help="Arrow routers with --emit adapter|names: name per query the adapter with the largest mean "
                   "Arrow weight over the query's tokens (engines cannot route per token).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@common_options
def predict_command(router, input_, out, model, mode, route_only, max_new_tokens, batch_size, emit, per_query,
                    overwrite):
    """Route the queries of INPUT to adapters and write what each got (id, text, adapters, weights, answer) to OUT;
    with --emit adapter|names, the adapter a serving engine should be asked for per query."""
    from ..routing.api import predict

    quiet = is_quiet()
    rows = predict(router, input_, out, model=model, mode=mode, route_only=route_only,
                   max_new_tokens=max_new_tokens, batch_size=batch_size, emit=emit, per_query=per_query,
                   overwrite=overwrite, progress=show_progress())
    if not quiet:
        counts: dict[str, int] = {}
        for r in rows:
            key = r["adapters"][0] if r["adapters"] else "(base)"
            counts[key] = counts.get(key, 0) + 1
        click.echo(f"{len(rows)} queries -> {out}; top-1: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
