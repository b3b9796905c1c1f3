"""``peftmerge search``: tune a merge on validation data (a thin layer over :func:`peftmerge.search.search`)."""

from __future__ import annotations

import click

from . import params
from .common import common_options, is_quiet, parse_floats, show_progress


@click.command("search", cls=params.MethodCommand)
@click.argument("inputs", nargs=-1, metavar="INPUT...")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output folder: the best merge + search trace.")
@click.option("--method", default=None, help="Merge method (default: ties); see `peftmerge methods`.")
@click.option("--data", multiple=True, metavar="NAME=FILE", help="Validation split of a task (never test), repeatable.")
@click.option("--model", default=None, help="Base model (default: the adapters' base_model_name_or_path).")
@click.option("--strategy", type=click.Choice(["grid", "es", "layerwise"]), default="grid", show_default=True,
              help="grid: one or two parameters; es: per-model weights by an evolution strategy; layerwise: "
                   "task-arithmetic (or regmean) coefficients per input and layer learned on the validation labels.")
@click.option("--grid", "grid", multiple=True, metavar="NAME=V1,V2,...",
              help="Grid values of a method parameter, e.g. lambda, density, gamma, off_diagonal (default: the "
                   "method's first two such parameters with their default grids, e.g. lambda x density).")
@click.option("--budget", type=int, default=40, show_default=True, help="ES: number of merges evaluated.")
@click.option("--population", type=int, default=8, show_default=True, help="ES: offspring per generation.")
@click.option("--sigma", type=float, default=0.3, show_default=True, help="ES: initial step size.")
@click.option("--l1", type=float, default=0.0, show_default=True, help="ES: L1 penalty on the weights (LoraHub).")
@click.option("--seed", type=int, default=0, show_default=True, help="ES seed / layerwise batch order.")
@click.option("--epochs", type=int, default=4, show_default=True, help="layerwise: passes over the validation rows.")
@click.option("--lr", type=float, default=0.05, show_default=True, help="layerwise: Adam learning rate.")
@click.option("--by", type=click.Choice(["layer", "module"]), default="layer", show_default=True,
              help="layerwise: one coefficient per input per transformer block, or per module.")
@click.option("--average", is_flag=True,
              help="layerwise: write the mean of the last half of the epochs' coefficients, not the best epoch.")
@click.option("--weights", default=None, help="Per-input weights (grid: fixed; es: the start point).")
@click.option("--grams", type=click.Path(), default=None, help="RegMean: the Gram matrices from `peftmerge grams`.")
@click.option("--rank", type=int, default=None, help="Output rank (default: sum of the input ranks).")
@click.option("--limit", type=int, default=200, show_default=True, help="Validation rows per task.")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--max-length", type=int, default=256, show_default=True)
@click.option("--alpha", type=float, default=None, help="lora_alpha of inputs that have no adapter_config.json.")
@click.option("--force", is_flag=True, help="Merge adapters of different base models.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@common_options
def search_command(inputs, out, method, data, model, strategy, grid, budget, population, sigma, l1, seed, epochs,
                   lr, by, average, weights, grams, rank, limit, batch_size, max_length, alpha, force, overwrite,
                   **method_params):
    """Tune lambda / density / per-model weights of a merge of INPUT... on validation splits; write the best.

    A method parameter given as an option (--density 0.3, ...) is held fixed; --lambda is also the start of every
    coefficient of --strategy layerwise (default 0.3)."""
    from ..search import search
    from ..search.search import parse_grid

    quiet = is_quiet()
    r = search(list(inputs), out, method, data=list(data), model=model, strategy=strategy, grid=parse_grid(grid),
               budget=budget, population=population, sigma=sigma, l1=l1, seed=seed,
               weights=parse_floats(weights, "--weights"), params=params.given(method_params), rank=rank,
               limit=limit, batch_size=batch_size, max_length=max_length, alpha=alpha, force=force, epochs=epochs,
               lr=lr, by=by, average=average, grams=grams, overwrite=overwrite, progress=show_progress())
    if not quiet and strategy == "layerwise":
        b = r["best"]
        when = f"at epoch {b['epoch']}" if isinstance(b["epoch"], int) else f"for the {b['epoch']}"
        click.echo(f"{r['method']} (layerwise by {by}, {epochs} epochs): validation score {b['score']:.4f} {when} "
                   f"({len(r['groups'])} groups x {len(r['inputs'])} inputs); wrote {out}")
    elif not quiet:
        b = r["best"]
        click.echo(f"{r['method']} ({r['strategy']}, {len(r['trace'])} merges): best validation score "
                   f"{b['score']:.4f} with params {b['params']} weights {b['weights']}; wrote {out}")
