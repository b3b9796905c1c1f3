"""The merge methods' and the routers' parameters as command-line options, made from their registries.

One option per parameter name (``--density`` serves every method that takes a density), its type and choices
from the :class:`~peftmerge.registry.Param`; the checks stay in the API (:meth:`Param.check`), so a bad value gets
the same one-line error from the command line and from Python. A new method's parameter is an option by itself.
The options are made when the command is first parsed (the methods import torch; ``peftmerge --help`` does not).
"""

from __future__ import annotations

import click

from .common import Command

PREFIX = "param_"  # the callback's keyword of each generated option: param_<name>


class _PerModel(click.ParamType):
    """A number, or one per input (comma-separated): ``0.3`` or ``0.3,0.5``."""

    name = "float[,float...]"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float, list)):
            return value
        try:
            values = [float(v) for v in str(value).split(",")]
        except ValueError:
            self.fail(f"{value!r} is not a number or a comma-separated list of numbers", param, ctx)
        return values[0] if len(values) == 1 else values


def methods():
    """``(parameters, how many entries, what an entry is, where its defaults are)`` of the merge methods."""
    from ..merge.registry import names, parameters

    return parameters(), len(names()), "method", "the method's, see `peftmerge methods`"


def routers():
    """The same for the routers."""
    from ..routing.registry import names, parameters

    return parameters(), len(names()), "router", "the router's"


def options(taken: set[str], family=methods) -> list[click.Option]:
    """A click option for every parameter of ``family`` whose name is not in ``taken`` (the command's own
    options)."""
    table, every, kind, defaults = family()
    out = []
    for name, (p, users) in table.items():
        if name in taken:
            continue
        if p.choices is not None:
            click_type = click.Choice([str(c) for c in p.choices])
        elif p.per_model:
            click_type = _PerModel()
        else:
            click_type = int if p.whole else float
        shared = f"any {kind}" if len(users) == every else ", ".join(users)
        out.append(click.Option([f"--{name.replace('_', '-')}", PREFIX + name], type=click_type, default=None,
                                help=f"{p.help[0].upper()}{p.help[1:]} ({shared}; default: {defaults})."))
    return out


def given(kwargs: dict) -> dict:
    """The method parameters among a callback's keyword arguments, by parameter name (the unset ones dropped)."""
    return {k[len(PREFIX):]: v for k, v in kwargs.items() if k.startswith(PREFIX) and v is not None}


class MethodCommand(Command):
    """A :class:`Command` that also takes every merge method's parameters as options (:func:`options`)."""

    family = staticmethod(methods)

    def get_params(self, ctx: click.Context):
        if not getattr(self, "_method_options", False):
            self._method_options = True
            taken = {o.lstrip("-").replace("-", "_") for p in self.params for o in p.opts}
            generated = options(taken, self.family)
            self.params[len(self.params):] = generated
        return super().get_params(ctx)


class RouterCommand(MethodCommand):
    """A :class:`Command` that also takes every router's parameters as options."""

    family = staticmethod(routers)
