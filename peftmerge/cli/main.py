"""The ``peftmerge`` console script: one click command per file in this package."""

from __future__ import annotations

import click

from .. import __version__
from .common import Group, debug_option


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="peftmerge")
@debug_option
def main() -> None:
    """Compose parameter-efficient adapters: merge, train, route, evaluate and share LoRA adapters."""


# Commands (one line each; keep sorted).
from .train import train, train_many  # noqa: E402

main.add_command(train)
main.add_command(train_many)

if __name__ == "__main__":  # pragma: no cover
    main()
