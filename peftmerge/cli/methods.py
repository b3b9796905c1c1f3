"""``peftmerge methods``: every merge method with its parameters and defaults."""

from __future__ import annotations

import click

from .common import debug_option


@click.command("methods")
@click.option("--verbose", "-v", is_flag=True, help="Also print each method's equation and paper.")
@debug_option
def methods_command(verbose):
    """List the merge methods, their parameters and the papers' defaults."""
    from ..merge.registry import methods

    for m in methods():
        params = ", ".join(f"{p.name}={p.default}" for p in m.params) or "(weights only)"
        alias = f" (alias: {', '.join(m.aliases)})" if m.aliases else ""
        kind = "exact, factor space" if m.linear else "dense per module, then rank-r SVD"
        click.echo(f"{m.name}{alias}: {params}  [{kind}]  {m.paper}")
        if verbose:
            click.echo("    " + m.doc.replace("\n", "\n    ") + "\n")
