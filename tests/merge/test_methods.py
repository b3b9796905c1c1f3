"""Each method against its reference on the same dense task vectors.

References: PEFT's ``peft.utils.merge_utils`` (ties, dare, task arithmetic, magnitude prune) and direct
transcriptions of the official code of Model Breadcrumbs (rezazzr/breadcrumbs) and PCB
(duguodong7/pcb-merging) in ``tests/golden/official.py``. ``test_golden.py`` checks the same against values frozen
from these anchors.
"""

import pytest
import torch
from golden import official
from peft.utils import merge_utils

from peftmerge.errors import PeftmergeError
from peftmerge.merge import execute, registry
from peftmerge.merge.engine import blocked, selection
from peftmerge.merge.methods import ops

N, SHAPE = 3, (24, 40)


@pytest.fixture
def deltas():
    torch.manual_seed(0)
    return torch.randn(N, *SHAPE)


WEIGHTS = torch.tensor([0.7, 1.3, 0.4])


def run(name, deltas, weights=WEIGHTS, generator=None, **given):
    m = registry.get(name)
    params = m.resolve(given, deltas.shape[0])
    return execute.dense(m, deltas, weights, params, registry.Context("m", generator))


@pytest.mark.parametrize("density", [0.1, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_ties_equals_peft(deltas, density, sign):
    ours = run("ties", deltas, density=density, sign=sign)
    ref = merge_utils.ties(list(deltas), WEIGHTS, density, sign)
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("density", [0.1, 0.3, 1.0])
def test_magnitude_prune_equals_peft(deltas, density):
    torch.testing.assert_close(run("magnitude_prune", deltas, density=density),
                               merge_utils.magnitude_prune(list(deltas), WEIGHTS, density))


def test_task_arithmetic_and_cat_equal_weighted_sum(deltas):
    ref = merge_utils.task_arithmetic(list(deltas), WEIGHTS)
    torch.testing.assert_close(run("task_arithmetic", deltas), ref)
    torch.testing.assert_close(run("linear", deltas, **{"lambda": 0.5}), 0.5 * ref)
    torch.testing.assert_close(run("cat", deltas), (WEIGHTS[:, None, None] * deltas).sum(0))


@pytest.mark.parametrize("name,peft_fn", [("dare_linear", "dare_linear"), ("dare_ties", "dare_ties")])
@pytest.mark.parametrize("density", [0.1, 0.5])
def test_dare_equals_peft_with_same_mask(deltas, name, peft_fn, density, monkeypatch):
    # PEFT draws its masks with torch.bernoulli on the global generator; ours come from per-block seeded
    # generators (ops.bernoulli_mask draws the engine's stream). Hand PEFT our masks, in its draw order.
    masks = iter(ops.bernoulli_mask(deltas, density, torch.Generator().manual_seed(7)).float())
    monkeypatch.setattr(merge_utils.torch, "bernoulli", lambda probs: next(masks))
    ours = run(name, deltas, generator=torch.Generator().manual_seed(7), density=density)
    ref = getattr(merge_utils, peft_fn)(list(deltas), WEIGHTS, density)
    torch.testing.assert_close(ours, ref)


def test_dare_masks_do_not_depend_on_threads():
    x = torch.randn(2, 300, 700)  # several row blocks
    m = registry.get("dare_ties")
    params = m.resolve({"density": 0.3}, 2)
    outs = [blocked.merge(m.sparse, blocked.Deltas.stacked(x), torch.ones(2), params, seed=11, workers=w)
            for w in (1, 2, 3)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_dare_keeps_expected_fraction_and_is_unbiased():
    x = torch.ones(1, 400, 400)
    out = run("dare_linear", x, weights=torch.ones(1), generator=torch.Generator().manual_seed(0), density=0.2)
    kept = (out != 0).float().mean()
    assert abs(kept - 0.2) < 0.01
    assert abs(out.mean() - 1.0) < 0.05  # rescaled by 1/density: E[out] = x


# --- Model Breadcrumbs and PCB: against the transcriptions of their official code (golden/official.py) -------

@pytest.mark.parametrize("density,gamma", [(0.1, 0.01), (0.3, 0.1), (0.5, 0.05)])
def test_breadcrumbs_equals_official(deltas, density, gamma):
    masked = torch.stack([official.breadcrumbs_mask(d, density, gamma) for d in deltas])
    ref = (WEIGHTS[:, None, None] * masked).sum(0)
    torch.testing.assert_close(run("breadcrumbs", deltas, density=density, gamma=gamma), ref)
    ref_ties = merge_utils.disjoint_merge(WEIGHTS[:, None, None] * masked,
                                          merge_utils.calculate_majority_sign_mask(masked, "total"))
    torch.testing.assert_close(run("breadcrumbs_ties", deltas, density=density, gamma=gamma), ref_ties)


def test_breadcrumbs_guards_tiny_rows():
    # mergekit zeroes a tensor where gamma * N < 1; a 5-wide row keeps its largest entries instead.
    x = torch.tensor([[[1.0, -5.0, 3.0, 0.5, 2.0]]])
    out = run("breadcrumbs", x, weights=torch.ones(1), density=0.4, gamma=0.01)
    torch.testing.assert_close(out, torch.tensor([[0.0, -5.0, 3.0, 0.0, 0.0]]))


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.3])
def test_pcb_equals_official(deltas, ratio):
    ref = official.pcb(deltas.reshape(N, -1), ratio).reshape(SHAPE)
    torch.testing.assert_close(run("pcb", deltas, weights=torch.ones(N), density=ratio), ref)


def test_pcb_weights_are_per_model_lambdas(deltas):
    w = torch.tensor([0.9, 1.2, 1.1])
    clamped, scores = ops.pcb_scores(deltas, 0.1)
    ref = ((w[:, None] * clamped * scores).sum(0) / scores.sum(0).clamp(min=1e-12)).reshape(SHAPE)
    torch.testing.assert_close(run("pcb", deltas, weights=w, density=0.1, **{"lambda": 1.0}), ref)


# --- invariants --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["task_arithmetic", "cat", "ties", "magnitude_prune", "breadcrumbs",
                                  "breadcrumbs_ties", "pcb"])
def test_input_order_does_not_matter(deltas, name):
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(run(name, deltas), run(name, deltas[perm], weights=WEIGHTS[perm]))


@pytest.mark.parametrize("name,params", [("task_arithmetic", {}), ("ties", {"density": 1.0}),
                                         ("magnitude_prune", {"density": 1.0}), ("dare_linear", {"density": 1.0})])
def test_single_input_at_weight_one_is_itself(deltas, name, params):
    one = deltas[:1]
    out = run(name, one, weights=torch.ones(1), generator=torch.Generator().manual_seed(0), **params)
    torch.testing.assert_close(out, one[0])


def test_global_thresholds_equal_exact_topk_over_all_modules():
    torch.manual_seed(3)
    modules = [torch.randn(2, 17, 9), torch.randn(2, 40, 33) * 3, torch.randn(2, 5, 64) * 0.1]
    t = selection.global_thresholds(lambda: iter(modules), 2, 0.2)
    flat = torch.cat([m.reshape(2, -1) for m in modules], dim=1)
    exact = ops.magnitude_mask(flat, 0.2)
    ours = torch.cat([ops.magnitude_mask(m, 0.2, t).reshape(2, -1) for m in modules], dim=1)
    assert torch.equal(ours, exact)
    assert ours.sum(1).tolist() == [int(0.2 * flat.shape[1])] * 2


def test_registry_lists_methods_and_rejects_unknown():
    assert {"task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "pcb",
            "magnitude_prune", "cat"} <= set(registry.names())
    with pytest.raises(PeftmergeError, match="unknown merge method 'tie'.*ties"):
        registry.get("tie")


@pytest.mark.parametrize("given,match", [({"density": 0.0}, r"density 0.0 is out of range"),
                                          ({"density": 1.5}, r"density 1.5 is out of range"),
                                          ({"sign": "avg"}, r"sign 'avg' is not one of total, frequency"),
                                          ({"gamma": 0.1}, r"ties takes no parameter 'gamma'")])
def test_parameters_are_checked(given, match):
    with pytest.raises(PeftmergeError, match=match):
        registry.get("ties").resolve(given, 2)


def test_magnitude_mask_keeps_exactly_k_with_ties():
    # bf16-like data: many equal magnitudes at the threshold; keep exactly int(density * n), lowest index first
    x = torch.tensor([[3.0, 1.0, -1.0, 1.0, 2.0, -1.0, 0.5, 1.0, 0.0, 4.0]])
    mask = ops.magnitude_mask(x, 0.5)
    assert int(mask.sum()) == 5
    assert mask[0].tolist() == [True, True, True, False, True, False, False, False, False, True]
