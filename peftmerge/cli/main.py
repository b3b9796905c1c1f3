"""The ``peftmerge`` console script: one click command per file in this package."""

from __future__ import annotations

import click

from ..version import __version__
from .combine import combine_command
from .common import Group, debug_option
from .eval import eval_command
from .extract import extract_command
from .grams import grams_command
from .inspect import inspect_command
from .methods import methods_command
from .predict import predict_command
from .push import push_command
from .route import route_command
from .search import search_command
from .train import train, train_many


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="peftmerge")
@debug_option
def main() -> None:
    """Compose parameter-efficient adapters: merge, train, route, evaluate and share LoRA adapters.

    Every command takes --quiet (the result only), --threads N (CPU threads) and --debug (tracebacks and
    the libraries' warnings), and refuses to replace an existing output without --overwrite.
    """


# Commands (one line each; keep sorted).
main.add_command(combine_command)
main.add_command(eval_command)
main.add_command(extract_command)
main.add_command(grams_command)
main.add_command(inspect_command)
main.add_command(methods_command)
main.add_command(predict_command)
main.add_command(push_command)
main.add_command(route_command)
main.add_command(search_command)
main.add_command(train)
main.add_command(train_many)

if __name__ == "__main__":  # pragma: no cover
    main()
