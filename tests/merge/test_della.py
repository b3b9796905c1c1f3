"""DELLA (Deep et al. 2024): MagPrune's keep probabilities, masks and rescale, and the TIES merge after it, against
mergekit's ``della`` and a transcription of the paper's algorithm on the same uniform draws; unbiased in expectation;
DARE-TIES at epsilon 0; checked parameters; found by the command line and the search by itself."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from conftest import make_adapter
from peftmerge.cli.main import main
from peftmerge.errors import PeftmergeError
from peftmerge.merge import execute, registry
from peftmerge.merge.methods import ops
from peftmerge.merge.methods.della import keep_probabilities

N, SHAPE = 3, (12, 20)
DELLA = registry.get("della")


@pytest.fixture
def deltas():
    return torch.randn(N, *SHAPE, generator=torch.Generator().manual_seed(0))


def ours(deltas, weights, seed=7, **given):
    params = DELLA.resolve(given, deltas.shape[0])
    return execute.dense(DELLA, deltas, weights, params, registry.Context("m", torch.Generator().manual_seed(seed)))


def draws(deltas, seed=7):
    """The uniform draws DELLA makes for each input (the module generator seeded ``seed``)."""
    return ops.uniforms(deltas, torch.Generator().manual_seed(seed))


def paper(deltas, weights, u, density, epsilon, lam):
    """The paper's algorithm (Sec. 3) as the official code runs it, written out: per row, ranks of |dW| (1 = the
    smallest) scaled to [0, 1], keep probabilities density - epsilon + rank * 2 epsilon, keep where the draw falls
    below, divide the kept by their probability; elect the sign of the sum, average the agreeing."""
    pruned = []
    for d, draw in zip(deltas.double(), u):
        rank = torch.argsort(torch.argsort(d.abs(), dim=1), dim=1).double() + 1
        lo, hi = rank.min(dim=1, keepdim=True).values, rank.max(dim=1, keepdim=True).values
        prob = (density - epsilon) + (rank - lo) / (hi - lo) * 2 * epsilon
        pruned.append(torch.where(draw < prob, d / prob, 0.0))
    v = weights.double()[:, None, None] * torch.stack(pruned)
    sign = torch.where(v.sum(0) >= 0, 1.0, -1.0)
    agree = (v * sign > 0).double()
    return (lam * (v * agree).sum(0) / (weights.double()[:, None, None] * agree).sum(0).clamp(min=1)).float()


@pytest.mark.parametrize("density,epsilon,lam", [(0.5, 0.1, 1.0), (0.7, 0.07, 1.1), (0.3, 0.25, 0.8)])
def test_equals_the_papers_algorithm_on_the_same_draws(deltas, density, epsilon, lam):
    got = ours(deltas, torch.ones(N), density=density, epsilon=epsilon, **{"lambda": lam})
    torch.testing.assert_close(got, paper(deltas, torch.ones(N), draws(deltas), density, epsilon, lam),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("density,epsilon,lam", [(0.5, 0.1, 1.0), (0.6, 0.15, 1.3)])
def test_equals_mergekits_della_on_the_same_draws(deltas, density, epsilon, lam, monkeypatch):
    """mergekit's della with ``rescale: false`` and its Bernoulli draws replaced by ours, divided by their keep
    probability (the paper's rescale, where mergekit's ``rescale: true`` matches the L1 norm instead): the same keep
    probabilities, masks and merge (weights 1: mergekit elects on the weighted task vectors, peftmerge's flags on the
    unweighted ones)."""
    mergekit = pytest.importorskip("mergekit")
    from mergekit.merge_methods.base import TensorEntry, TensorGroup
    from mergekit.merge_methods.registry import get

    u, seen = iter(draws(deltas)), []

    def bernoulli(probs, *args, **kwargs):
        seen.append(probs.clone())
        draw = next(u).reshape(probs.shape)
        return torch.where(draw < probs.double(), 1.0 / probs.double(), 0.0).to(probs.dtype)

    monkeypatch.setattr(mergekit.sparsify.torch, "bernoulli", bernoulli)
    base = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    group = TensorGroup([TensorEntry("base", base, is_base=True)] +
                        [TensorEntry(i, base + deltas[i]) for i in range(N)])
    theirs = get("della").merge_group(group, int8_mask=False, normalize=True, rescale=False, **{"lambda": lam},
                                      weight={i: 1.0 for i in range(N)}, density={i: density for i in range(N)},
                                      epsilon={i: epsilon for i in range(N)}) - base
    for d, probs in zip(deltas, seen):
        torch.testing.assert_close(keep_probabilities(d.abs(), density, epsilon).float(), probs, atol=1e-6, rtol=0)
    got = ours(deltas, torch.ones(N), density=density, epsilon=epsilon, **{"lambda": lam})
    torch.testing.assert_close(got, theirs, atol=1e-5, rtol=1e-5)


def test_keeps_density_on_average_more_of_the_large_entries_and_is_unbiased():
    d = torch.randn(1, 64, 200, generator=torch.Generator().manual_seed(2))
    p = keep_probabilities(d[0].abs(), 0.4, 0.2)
    assert torch.allclose(p.mean(dim=1), torch.full((64,), 0.4, dtype=torch.float64))  # density per row
    assert p.min() == pytest.approx(0.2) and p.max() == pytest.approx(0.6)
    big = d[0].abs() > d[0].abs().median(dim=1, keepdim=True).values
    assert p[big].min() > p[~big].max()  # the larger half is kept more often
    runs = torch.stack([ours(d, torch.ones(1), seed=s, density=0.4, epsilon=0.2) for s in range(400)])
    assert (runs != 0).float().mean().item() == pytest.approx(0.4, abs=0.01)
    # E[m / p * dW] = dW: the mean of 400 draws is within 4 standard errors, entry by entry
    err = (runs.mean(0) - d[0]).abs() / (d[0].abs() * ((1 - p) / p).sqrt().float() / 20).clamp(min=1e-6)
    assert err.max() < 5 and err.mean() < 1


def test_at_epsilon_zero_it_is_dare_ties_mask_for_mask(deltas):
    w = torch.tensor([0.7, 1.3, 0.4])
    dare = registry.get("dare_ties")
    expected = execute.dense(dare, deltas, w, dare.resolve({"density": 0.4}, N),
                             registry.Context("m", torch.Generator().manual_seed(7)))
    torch.testing.assert_close(ours(deltas, w, density=0.4, epsilon=0.0), expected, atol=0, rtol=0)


def test_the_engine_equals_the_reference_and_rows_are_the_weights_rows(deltas):
    params = DELLA.resolve({"density": 0.6}, N)
    w = torch.tensor([0.7, 1.3, 0.4])
    ref = DELLA.reference(deltas, w, params, registry.Context("m", torch.Generator().manual_seed(7)))
    torch.testing.assert_close(ours(deltas, w, density=0.6), ref, atol=1e-6, rtol=1e-6)
    one = torch.randn(N, 30, generator=torch.Generator().manual_seed(3))  # a bias: one row
    ref = DELLA.reference(one, w, params, registry.Context("b", torch.Generator().manual_seed(7)))
    got = execute.dense(DELLA, one, w, params, registry.Context("b", torch.Generator().manual_seed(7)))
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("given,match", [({"density": 0.1, "epsilon": 0.1}, r"density 0.1 with epsilon 0.1"),
                                         ({"density": 0.95}, r"density 0.95 with epsilon 0.07 .*lower epsilon"),
                                         ({"epsilon": 0.6}, r"epsilon 0.6 is out of range")])
def test_probabilities_outside_0_1_are_refused(given, match):
    with pytest.raises(PeftmergeError, match=match):
        DELLA.resolve(given, 2)
    assert DELLA.resolve({"density": 1.0, "epsilon": 0.3}, 2)["density"] == 1.0  # keeps everything


def test_the_command_line_and_the_search_find_it(tmp_path):
    from peftmerge.search.search import _axes

    r = CliRunner().invoke(main, ["methods"])
    assert "della: lambda=1.0, density=0.7, epsilon=0.07, sign=total, seed=0" in r.stdout
    a = make_adapter(tmp_path / "a", seed=1, targets=("q_proj", "v_proj"))
    b = make_adapter(tmp_path / "b", seed=2, targets=("q_proj", "v_proj"))
    r = CliRunner().invoke(main, ["combine", str(a), str(b), "-o", str(tmp_path / "m"), "--method", "della",
                                  "--epsilon", "0.1", "--density", "0.5", "--quiet"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["combine", str(a), str(b), "-o", str(tmp_path / "x"), "--method", "della",
                                  "--epsilon", "0.45"])
    assert r.exit_code == 2 and "della keeps entries with probabilities" in r.stderr
    assert _axes(None, DELLA) == {"lambda": [0.3, 0.5, 0.7, 1.0, 1.3, 1.6], "density": [0.1, 0.2, 0.4, 0.7]}
    assert _axes({"epsilon": [0.0, 0.1]}, DELLA) == {"epsilon": [0.0, 0.1]}
