"""``peftmerge methods``: every merge method with its parameters and defaults."""

from __future__ import annotations

import click

from .common import Command, common_options


def _how(m) -> str:
    """How a method's LoRA merge is computed (``combine``'s paths)."""
    if m.linear:
        return "exact, factor space"
    if m.factored is not None:
        grams = "; needs --grams" if m.needs_grams else ""
        return ("exact, factor space" if m.components is not None else "factor space (SVDs of the factors)") + grams
    if m.sparse is not None:
        return "per module from the factors, then rank-r SVD"
    return "dense per module, then rank-r SVD"


@click.command("methods", cls=Command)
@click.option("--verbose", "-v", is_flag=True, help="Also print each method's equation and paper.")
@common_options
def methods_command(verbose):
    """List the merge methods, their parameters and the papers' defaults."""
    from ..merge.registry import methods

    for m in methods():
        params = ", ".join(f"{p.name}={p.default}" for p in m.params) or "(weights only)"
        alias = f" (alias: {', '.join(m.aliases)})" if m.aliases else ""
        kind = _how(m)
        click.echo(f"{m.name}{alias}: {params}  [{kind}]  {m.paper}")
        if verbose:
            click.echo("    " + m.doc.replace("\n", "\n    ") + "\n")
