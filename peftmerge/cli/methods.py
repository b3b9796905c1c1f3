"""``peftmerge methods``: every merge method with its parameters and defaults."""

from __future__ import annotations

import click

from .common import Command, common_options


@click.command("methods", cls=Command)
@click.option("--verbose", "-v", is_flag=True, help="Also print each method's equation and paper.")
@common_options
def methods_command(verbose):
    """List the merge methods, their parameters and the papers' defaults."""
    from ..merge.execute import describe
    from ..merge.registry import methods

    for m in methods():
        params = ", ".join(f"{p.name}={p.default}" for p in m.params) or "(weights only)"
        alias = f" (alias: {', '.join(m.aliases)})" if m.aliases else ""
        kind = describe(m)
        click.echo(f"{m.name}{alias}: {params}  [{kind}]  {m.paper}")
        if verbose:
            click.echo("    " + m.doc.replace("\n", "\n    ") + "\n")
