"""`peftmerge train`'s options are TrainConfig's fields with TrainConfig's defaults: the CLI restates no default of
its own, so the Python API and the command train the same adapter from the same arguments."""

from __future__ import annotations

import dataclasses

import click

from peftmerge.cli.main import main
from peftmerge.train.config import TrainConfig

COMMON = {"debug", "quiet", "threads", "push_to_hub"}  # every command's options, and train's own upload step


def default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else None


def test_every_train_option_is_a_config_field_with_its_default():
    command = main.commands["train"]
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    options = {p.name: p for p in command.params}
    assert set(fields) == set(options) - COMMON, "an option without a TrainConfig field, or a field without option"
    for name, option in options.items():
        if name in COMMON:
            continue
        want = default(fields[name])
        if option.default in (None, click.core.UNSET) or getattr(option, "is_flag", False) and not option.default:
            # unset: the config's own default applies (required values, flags off, empty mappings)
            assert want in (None, "", False, {}, []), f"--{name}: the CLI leaves it unset, TrainConfig says {want!r}"
        else:
            assert option.default == want, f"--{name}: CLI default {option.default!r}, TrainConfig {want!r}"
