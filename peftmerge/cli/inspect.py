"""``peftmerge inspect``: conflict diagnostics of LoRA adapters (a thin layer over :func:`peftmerge.analysis.inspect.inspect`)."""

from __future__ import annotations

import click

from .common import Command, common_options, show_progress


@click.command("inspect", cls=Command)
@click.argument("inputs", nargs=-1, metavar="INPUT...")
@click.option("-o", "--out", type=click.Path(), default=None, help="Folder for inspect.json/.md and PNG heatmaps.")
@click.option("--density", type=float, default=0.2, show_default=True,
              help="Fraction of entries in each top-k mask (sign conflict and overlap).")
@click.option("--alpha", type=float, default=None, help="lora_alpha of inputs that have no adapter_config.json.")
@click.option("--force", is_flag=True, help="Compare adapters of different base models.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@common_options
def inspect_command(inputs, out, density, alpha, force, overwrite):
    """Cosine similarity, sign conflicts, mask overlap and norms of the task vectors of INPUT... ."""
    from ..analysis.inspect import inspect, markdown

    result = inspect(list(inputs), out, density=density, alpha=alpha, force=force, overwrite=overwrite,
                     progress=show_progress())
    click.echo(markdown(result))
