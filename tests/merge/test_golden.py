"""Parity held to frozen values: tests/golden/golden.safetensors holds what PEFT's merge_utils, mergekit's merge
methods and the official algorithms' transcriptions give on fixed inputs (written once by
``python tests/golden/make_golden.py``). peftmerge must equal them with or without the anchors installed; where an
anchor is installed it is run again and must still give the frozen values, so a changed anchor is noticed (then
look at what changed, and regenerate the file with the script)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from golden import make_golden

FROZEN = load_file(str(make_golden.GOLDEN))
CASES = {c.name: c for c in make_golden.cases()}
with safe_open(str(make_golden.GOLDEN), "pt") as f:
    META = f.metadata()


def test_every_case_is_frozen():
    assert set(FROZEN) == set(CASES), "run python tests/golden/make_golden.py"
    assert set(json.loads(META["anchors"])) == {"torch", "peft", "mergekit"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_peftmerge_equals_the_frozen_anchor(name):
    torch.testing.assert_close(CASES[name].ours().float(), FROZEN[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_anchor_still_gives_the_frozen_values(name):
    source = CASES[name].source
    if source == "mergekit" and importlib.util.find_spec("mergekit") is None:
        pytest.skip("mergekit is not installed (pip install -e .[test]); peftmerge is checked against the frozen "
                    "values above")
    frozen_with = json.loads(META["anchors"])
    torch.testing.assert_close(CASES[name].anchor().float(), FROZEN[name], atol=1e-6, rtol=1e-6,
                               msg=lambda m: f"{source} no longer gives the {name} frozen with {frozen_with}: {m}")
