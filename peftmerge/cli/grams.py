"""``peftmerge grams``: measure the adapters' layer-input Gram matrices for RegMean (a thin layer over
:func:`peftmerge.analysis.grams.grams`)."""

from __future__ import annotations

import click

from .common import Command, common_options, is_quiet, show_progress


@click.command("grams", cls=Command)
@click.argument("inputs", nargs=-1, metavar="INPUT...")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output file (.safetensors).")
@click.option("--data", multiple=True, metavar="TASK=FILE",
              help="Rows of each adapter's task (validation or train split, never test), repeatable.")
@click.option("--model", default=None, help="Base model (default: the adapters' base_model_name_or_path).")
@click.option("--limit", type=int, default=400, show_default=True, help="Rows per task.")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--max-length", type=int, default=256, show_default=True)
@click.option("--alpha", type=float, default=None, help="lora_alpha of inputs that have no adapter_config.json.")
@click.option("--force", is_flag=True, help="Adapters of different base models / with no module in common.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@common_options
def grams_command(inputs, out, data, model, limit, batch_size, max_length, alpha, force, overwrite):
    """Measure, for each adapter INPUT... on rows of its own task, the Gram matrix of every adapted linear
    layer's inputs; `peftmerge combine --method regmean --grams OUT` reads them."""
    from ..analysis.grams import grams

    quiet = is_quiet()
    r = grams(list(inputs), out, data=list(data), model=model, limit=limit, batch_size=batch_size,
              max_length=max_length, alpha=alpha, force=force, overwrite=overwrite, progress=show_progress())
    if not quiet:
        counts = ", ".join(f"{t} {n} tokens" for t, n in r["tokens"].items())
        click.echo(f"grams: {r['modules']} modules x {len(r['tasks'])} tasks ({counts}) into {out}")
