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


README_MARK = "<!-- methods table (generated: peftmerge methods --readme) -->"


def paper_name(m) -> str:
    """The method's paper as its docstring's first line names it, e.g. "TIES-Merging (Yadav et al., 2023)"."""
    import re

    first = m.doc.split("\n\n")[0].replace("\n", " ")
    name, _, rest = first.partition(" (")
    who = rest.split(",")[0]
    year = re.search(r"\b(?:19|20)\d\d\b", rest.split(")")[0])
    if " et al" in who or " & " in who:
        return f"{name} ({who}, {year.group(0)})" if year else f"{name} ({who})"
    return name.rstrip(".:")


def readme_table() -> str:
    """The README's short methods table: name, paper, parameters with defaults."""
    from ..merge.registry import methods

    rows = [README_MARK, "| method | paper | parameters (defaults) |", "|---|---|---|"]
    for m in methods():
        params = ", ".join(f"`{p.name}={p.default}`" for p in m.params) or "weights only"
        link = m.paper if m.paper.startswith("http") else ""
        paper = f"[{paper_name(m)}]({link.split()[0]})" if link else paper_name(m)
        rows.append(f"| `{m.name}` | {paper} | {params} |")
    return "\n".join(rows)


@click.command("methods", cls=Command)
@click.option("--verbose", "-v", is_flag=True, help="Also print each method's equation and paper.")
@click.option("--markdown", is_flag=True, help="Print the methods as a markdown page (docs/methods.md).")
@click.option("--readme", is_flag=True, help="Print the README's short methods table.")
@common_options
def methods_command(verbose, markdown, readme):
    """List the merge methods, their parameters and the papers' defaults."""
    from ..merge.execute import describe
    from ..merge.registry import methods

    if markdown or readme:
        click.echo(table() if markdown else readme_table())
        return
    for m in methods():
        params = ", ".join(f"{p.name}={p.default}" for p in m.params) or "(weights only)"
        alias = f" (alias: {', '.join(m.aliases)})" if m.aliases else ""
        click.echo(f"{m.name}{alias}: {params}  [{describe(m)}]  {m.paper}")
        if verbose:
            click.echo("    " + m.doc.replace("\n", "\n    ") + "\n")
