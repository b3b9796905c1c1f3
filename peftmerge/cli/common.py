"""What every command shares: the ``--debug`` flag and turning user errors into exit code 2."""

from __future__ import annotations

import click

from ..errors import PeftmergeError

DEBUG_KEY = "peftmerge.debug"


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[DEBUG_KEY] = True


def debug_option(f):
    """``--debug``: show the full traceback instead of the one-line error."""
    return click.option(
        "--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
        help="Show the full traceback on errors.",
    )(f)


class Group(click.Group):
    """A click group that prints :class:`PeftmergeError` as one line and exits with code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PeftmergeError as e:
            if ctx.meta.get(DEBUG_KEY):
                raise
            click.echo(f"Error: {e}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            if ctx.meta.get(DEBUG_KEY):
                raise
            click.echo("Interrupted: nothing was written.", err=True)
            ctx.exit(130)


def parse_floats(value: str | None, name: str) -> list[float] | None:
    """``"0.5,0.3"`` -> ``[0.5, 0.3]``; a clear error naming the option otherwise."""
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",") if v.strip() != ""]
    except ValueError:
        raise PeftmergeError(f"{name} {value!r} is not a comma-separated list of numbers (e.g. 0.5,0.3,0.2)") from None
