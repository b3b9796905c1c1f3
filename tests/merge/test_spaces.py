"""The spaces a merge runs in (``space``: full, core, knots): Core Space and KnOTS are the full-space merge exactly for
linear and rotation-invariant methods; their adapters have rank <= the sum of the input ranks and load in PEFT with
the logits of W0 + the official algorithm's dW applied by hand; the default space per method family and output; the
one-line refusals."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from conftest import make_adapter, tiny_llama
from golden import official
from peftmerge.cli.main import main
from peftmerge.errors import PeftmergeError
from peftmerge.io.adapter import load_adapter
from peftmerge.merge.combine import combine


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """Three adapters: mixed ranks, rsLoRA, a module only one of them adapts, an embedding."""
    root = tmp_path_factory.mktemp("spaces")
    return root, [make_adapter(root / "a", seed=1, r=4, alpha=8, targets=("q_proj", "v_proj", "embed_tokens")),
                  make_adapter(root / "b", seed=2, r=2, alpha=3, targets=("q_proj", "o_proj", "embed_tokens"),
                               use_rslora=True),
                  make_adapter(root / "c", seed=3, r=3, alpha=6, targets=("q_proj", "v_proj"))]


def relative(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).norm() / y.double().norm())


@pytest.mark.parametrize("method,tol", [("task_arithmetic", 1e-6), ("cat", 1e-6), ("iso_c", 1e-5), ("tsv", 1e-5)])
@pytest.mark.parametrize("space", ["core", "knots"])
def test_linear_and_rotation_invariant_methods_equal_the_full_space_merge(three, tmp_path, method, tol, space):
    """TSV-Merge keeps min(shape) / n triplets of each input: R / n in these spaces, each input's rank where every
    input adapts the module with the same rank (the official setting), as it is checked here."""
    root, inputs = three
    if method == "tsv":
        inputs = [make_adapter(root / f"tsv{i}", seed=20 + i, r=3, alpha=6, targets=("q_proj", "v_proj"))
                  for i in range(3)] if not (root / "tsv2").exists() else [root / f"tsv{i}" for i in range(3)]
    kw = dict(weights=[0.7, 1.3, -0.4], progress=False)
    combine(inputs, tmp_path / "full", method, space="full", **kw)
    combine(inputs, tmp_path / space, method, space=space, **kw)
    x, y, ins = load_adapter(tmp_path / "full"), load_adapter(tmp_path / space), [load_adapter(p) for p in inputs]
    for name in x.modules:
        assert relative(y.delta(name), x.delta(name)) < tol, name
        assert y.modules[name].rank <= sum(a.modules[name].rank for a in ins if name in a.modules)


@pytest.mark.parametrize("space,density", [("core", 0.23), ("knots", 0.2057)])
def test_in_space_adapter_loads_in_peft_with_the_logits_of_the_official_merge_applied_by_hand(tmp_path, space,
                                                                                             density):
    """TIES in Core Space / KnOTS: the adapter PEFT loads gives the logits of W0 + the official algorithm's dW.
    Three rank-2 adapters: cores of 6 x 6 = 36 entries, KnOTS rows of 6 x 32 = 192; the official top-k 0.2 keeps
    int(36 * 0.2) + 1 = 8 and 39 entries, what peftmerge's density 0.23 and 0.2057 keep."""
    from peft import PeftModel

    targets = ("q_proj", "v_proj")
    inputs = [make_adapter(tmp_path / f"in{i}", seed=10 + i, r=2, alpha=4, targets=targets) for i in range(3)]
    report = combine(inputs, tmp_path / "merged", "ties", space=space, density=density, progress=False)
    assert report["params"]["space"] == space and report["rank_out_max"] <= 6
    assert all(row["rank_out"] <= 6 and row["relative_error"] < 1e-12 for row in report["per_module"])
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 2, 7]])
    with torch.no_grad():
        got = PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "merged")).eval()(ids).logits
        by_hand = tiny_llama(0)
        loaded = [load_adapter(p) for p in inputs]
        for name in loaded[0].modules:
            factors = [(b, a) for a, b in (x.scaled_factors(name) for x in loaded)]
            merge = official.core_space if space == "core" else official.knots
            by_hand.get_submodule(name).weight += merge(factors, "ties", top_k=0.2)
        expected = by_hand(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_the_default_space_is_the_method_familys_for_adapters_and_full_for_full_models(three, tmp_path):
    root, inputs = three
    spaces = {m: combine(inputs, tmp_path / m, m, progress=False)["params"]["space"]
              for m in ("task_arithmetic", "tsv", "ties", "magnitude_prune", "dare_ties", "pcb", "wudi")}
    assert spaces == {"task_arithmetic": "full", "tsv": "full", "ties": "full", "magnitude_prune": "full",
                      "dare_ties": "full", "pcb": "full", "wudi": "core"}
    assert combine(inputs, tmp_path / "g", "ties", granularity="global", progress=False)["params"]["space"] == "full"
    tiny_llama(0).save_pretrained(str(root / "base"))
    assert combine(inputs, tmp_path / "model", "ties", base=root / "base", progress=False)["params"]["space"] == "full"


def test_space_errors_are_one_line_and_name_the_fix(three, tmp_path):
    root, inputs = three
    with pytest.raises(PeftmergeError, match="space 'diagonal' is not one of full, core, knots"):
        combine(inputs, tmp_path / "x", "ties", space="diagonal", progress=False)
    with pytest.raises(PeftmergeError, match="granularity=global .* use granularity=tensor with space core"):
        combine(inputs, tmp_path / "x", "ties", space="core", granularity="global", progress=False)
    tiny_llama(0).save_pretrained(str(root / "ft"))
    tiny_llama(0).save_pretrained(str(root / "base0"))
    with pytest.raises(PeftmergeError, match="full checkpoint has no LoRA factors .* drop --space"):
        combine([inputs[0], root / "ft"], tmp_path / "x", "ties", space="knots", base=root / "base0",
                progress=False)
    assert not (tmp_path / "x").exists()


def test_cli_space_option(three, tmp_path):
    root, inputs = three
    r = CliRunner().invoke(main, ["combine", *map(str, inputs), "-o", str(tmp_path / "m"), "--method", "dare_ties",
                                  "--space", "knots", "--quiet"])
    assert r.exit_code == 0, r.output
    assert load_adapter(tmp_path / "m").modules
    r = CliRunner().invoke(main, ["combine", *map(str, inputs), "-o", str(tmp_path / "n"), "--space", "cores"])
    assert r.exit_code == 2 and "'cores' is not one of" in r.output


def test_a_yaml_recipe_sets_the_space_for_mergekits_methods_too(three, tmp_path):
    import yaml

    root, inputs = three
    outs = {}
    for space in ("full", "core"):
        cfg = {"merge_method": "task_arithmetic", "parameters": {"space": space},
               "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(inputs, (0.7, 1.3, 0.4))]}
        (tmp_path / f"{space}.yml").write_text(yaml.safe_dump(cfg))
        report = combine(config=tmp_path / f"{space}.yml", out=tmp_path / space, progress=False)
        assert report["params"]["space"] == space
        outs[space] = load_adapter(tmp_path / space)
    for name in outs["full"].modules:
        assert relative(outs["core"].delta(name), outs["full"].delta(name)) < 1e-6
    cfg = {"merge_method": "ties", "parameters": {"space": "knots"},
           "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.4}} for p in inputs]}
    (tmp_path / "ties.yml").write_text(yaml.safe_dump(cfg))
    report = combine(config=tmp_path / "ties.yml", out=tmp_path / "ties", progress=False)
    assert report["params"]["space"] == "knots" and report["rank_out_max"] <= 9
    with pytest.raises(PeftmergeError, match="--space would change it: set it in the recipe"):
        combine(config=tmp_path / "ties.yml", out=tmp_path / "x", space="core", progress=False)
    cfg["parameters"]["space"] = "cores"
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(PeftmergeError, match="bad.yml: parameters: space 'cores' is not one of full, core, knots"):
        combine(config=tmp_path / "bad.yml", out=tmp_path / "x", progress=False)
