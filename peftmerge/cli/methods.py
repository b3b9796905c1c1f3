"""``peftmerge methods``: every merge method with its parameters and defaults, read from the registry."""

from __future__ import annotations

import click

from .common import Command, common_options


PAGE = """# Merge methods

Every method `peftmerge combine --method NAME` and `peftmerge search --method NAME` take, with its parameters and
the paper's defaults (each parameter is an option of both commands: `--density 0.3`; in Python
`peftmerge.combine(..., params={"density": 0.3})`). "LoRA output" says how an adapter output is computed
(`docs/engine.md`). This page is generated from the registry: `peftmerge methods --markdown > docs/methods.md`;
`peftmerge methods -v` prints each method's equations. To add a method: `docs/adding-a-method.md`.

"""


def table() -> str:
    """``docs/methods.md``: the methods as a markdown table under :data:`PAGE`."""
    from ..merge.execute import describe
    from ..merge.registry import methods

    rows = ["| method | parameters (defaults) | LoRA output | paper |", "|---|---|---|---|"]
    for m in methods():
        params = ", ".join(f"`{p.name}={p.default}`" for p in m.params) or "weights only"
        alias = f" (alias `{'`, `'.join(m.aliases)}`)" if m.aliases else ""
        rows.append(f"| `{m.name}`{alias} | {params} | {describe(m)} | {m.paper} |")
    return PAGE + "\n".join(rows)


@click.command("methods", cls=Command)
@click.option("--verbose", "-v", is_flag=True, help="Also print each method's equation and paper.")
@click.option("--markdown", is_flag=True, help="Print the methods as a markdown page (docs/methods.md).")
@common_options
def methods_command(verbose, markdown):
    """List the merge methods, their parameters and the papers' defaults."""
    from ..merge.execute import describe
    from ..merge.registry import methods

    if markdown:
        click.echo(table())
        return
    for m in methods():
        params = ", ".join(f"{p.name}={p.default}" for p in m.params) or "(weights only)"
        alias = f" (alias: {', '.join(m.aliases)})" if m.aliases else ""
        click.echo(f"{m.name}{alias}: {params}  [{describe(m)}]  {m.paper}")
        if verbose:
            click.echo("    " + m.doc.replace("\n", "\n    ") + "\n")
