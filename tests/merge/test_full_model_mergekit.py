"""peftmerge's own flags (the papers' conventions) against mergekit (0.1.5), where the definitions agree.

They agree for task_arithmetic (any weights and lambda) and for ties with all weights 1: mergekit elects
TIES signs on the *weighted* task vectors and divides by the sum of the agreeing weights, PEFT and
peftmerge's flags elect on the unweighted ones and divide by their count, which is the same only at weights 1.
They differ by definition for dare (mergekit rescales to the L1 norm instead of by 1/density, and its
masks come from another generator) and breadcrumbs (mergekit ranks over the whole tensor; the official
code and peftmerge per row). A YAML recipe (``--config``) takes mergekit's definitions instead:
tests/test_mergekit_parity.py.
"""

from __future__ import annotations

import mergekit  # noqa: F401  (a test dependency: fail loudly without it)
import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file

from peftmerge.merge.combine import combine


def _fine_tune(folder, seed):
    model = tiny_llama(0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    model.save_pretrained(str(folder))
    return folder


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _mergekit(out, method, base, inputs, weights, params):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = {"merge_method": method, "base_model": str(base), "dtype": "float32", "parameters": params.get("top", {}),
              "models": [{"model": str(p), "parameters": {"weight": w, **params.get("model", {})}}
                         for p, w in zip(inputs, weights)]}
    run_merge(MergeConfiguration.model_validate(config), str(out),
              options=MergeOptions(copy_tokenizer=False, quiet=True))
    return _tensors(out)


@pytest.mark.parametrize("method,weights,mk_params,ours", [
    ("task_arithmetic", [1.0, 0.5, 2.0], {"top": {"lambda": 0.7}}, {"lam": 0.7}),
    ("ties", [1.0, 1.0, 1.0], {"model": {"density": 0.2}}, {"density": 0.2}),
    ("ties", [1.0, 1.0, 1.0], {"model": {"density": 0.5}, "top": {"lambda": 0.6}}, {"density": 0.5, "lam": 0.6}),
])
def test_full_merge_equals_mergekit(tmp_path, method, weights, mk_params, ours):
    base = tmp_path / "base"
    tiny_llama(0).save_pretrained(str(base))
    inputs = [_fine_tune(tmp_path / f"ft{i}", 20 + i) for i in range(3)]
    theirs = _mergekit(tmp_path / "mergekit", method, base, inputs, weights, mk_params)
    combine(inputs, tmp_path / "ours", method, weights=weights, base=base, progress=False, **ours)
    mine = _tensors(tmp_path / "ours")
    assert set(mine) == set(theirs)
    for name, t in theirs.items():
        torch.testing.assert_close(mine[name], t, atol=1e-6, rtol=1e-6, msg=name)
    w0 = load_file(str(base / "model.safetensors"))
    assert max(float((mine[n] - w0[n]).abs().max()) for n in w0) > 1e-3  # the merge changed the model


def test_ties_with_unequal_weights_differs_from_mergekit_by_definition(tmp_path):
    """mergekit elects signs on weighted task vectors and normalises by the agreeing weights: not PEFT's TIES."""
    base = tmp_path / "base"
    tiny_llama(0).save_pretrained(str(base))
    inputs = [_fine_tune(tmp_path / f"ft{i}", 30 + i) for i in range(3)]
    weights = [1.0, 0.3, 2.0]
    theirs = _mergekit(tmp_path / "mergekit", "ties", base, inputs, weights, {"model": {"density": 0.5}})
    combine(inputs, tmp_path / "ours", "ties", weights=weights, density=0.5, base=base, progress=False)
    mine = _tensors(tmp_path / "ours")
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(mine[name], theirs[name], atol=1e-4)
