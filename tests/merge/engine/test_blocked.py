"""The row-blocked engine equals each sparse method's reference composition of ``ops`` (and so PEFT's and
the official code's, which test_merge_methods checks for the references), on shapes of one to many
blocks, with values tied in magnitude as bf16 task vectors are."""

import pytest
import torch

from peftmerge.merge import execute, registry
from peftmerge.merge.engine import blocked
from peftmerge.merge.methods import ops

SHAPES = [(24, 40), (300, 1024), (5000, 37), (70_000,), (3,)]  # one block, several, a 1-D tensor
CASES = [("ties", {"density": 0.2}), ("ties", {"density": 0.5, "sign": "frequency"}),
         ("magnitude_prune", {"density": 0.3}), ("dare_ties", {"density": 0.3}), ("dare_linear", {"density": 0.5}),
         ("breadcrumbs", {"density": 0.2, "gamma": 0.05}), ("breadcrumbs_ties", {"density": 0.1, "gamma": 0.01})]
W = torch.tensor([0.7, 1.3, 0.4])


def _data(shape, tied: bool):
    g = torch.Generator().manual_seed(len(shape) * 1000 + shape[0])
    if tied:  # few distinct magnitudes: many entries equal the top-k threshold
        return torch.randint(-20, 21, (3, *shape), generator=g) * 0.01
    return torch.randn(3, *shape, generator=g)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tied", [False, True])
def test_engine_equals_reference_composition(shape, tied):
    deltas = _data(shape, tied)
    for name, given in CASES:
        m = registry.get(name)
        params = m.resolve(given, 3)
        ours = execute.dense(m, deltas, W, params, registry.Context("m", torch.Generator().manual_seed(5)))
        ref = m.fn(deltas, W, params, registry.Context("m", torch.Generator().manual_seed(5)))
        torch.testing.assert_close(ours, ref, atol=2e-6, rtol=1e-6, msg=f"{name} {given} {shape} tied={tied}")


def test_topk_keeps_exactly_k_with_ties_in_index_order():
    x = _data((700, 300), tied=True)[:1]  # 210k entries over 4 blocks, ~5k per distinct magnitude
    for density in (0.05, 0.2, 0.61):
        out = blocked.merge(registry.Sparse("magnitude", "sum"), blocked.Deltas.stacked(x), [1.0],
                            {"density": density})
        kept = out != 0  # the threshold is above 0 here, so every kept entry is nonzero
        assert int(kept.sum()) == int(density * x.numel())
        assert torch.equal(kept, ops.magnitude_mask(x, density)[0])


def test_checkpoint_inputs_write_base_plus_merge_in_the_output_dtype():
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(600, 256, generator=g) * 0.02).bfloat16()
    thetas = [(base.float() + torch.randn(600, 256, generator=g) * 0.002).bfloat16() for _ in range(3)]
    deltas = torch.stack([t.float() - base.float() for t in thetas])
    m = registry.get("ties")
    params = m.resolve({"density": 0.2}, 3)
    out = torch.empty(600, 256, dtype=torch.bfloat16)
    ranges = []
    src = blocked.Deltas([("theta", t) for t in thetas], base, (600, 256))
    blocked.merge(m.sparse, src, torch.ones(3), params, out=out, ranges=ranges)
    ref = (m.fn(deltas, torch.ones(3), params, registry.Context("m")) + base.float()).bfloat16()
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert len(ranges) == src.nblocks
    assert min(lo for lo, _ in ranges) == float(out.min()) and max(hi for _, hi in ranges) == float(out.max())


def test_linear_full_checkpoints_and_lora_deltas():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(300, 500, generator=g)
    theta, dw = base + torch.randn(300, 500, generator=g), torch.randn(300, 500, generator=g)
    out = torch.empty(300, 500)
    blocked.linear(blocked.Deltas([("theta", theta), ("delta", dw), None], base, (300, 500)), [0.5, 2.0, 3.0], out)
    torch.testing.assert_close(out, base + 0.5 * (theta - base) + 2.0 * dw, atol=1e-5, rtol=1e-5)


def test_fused_merge_returns_its_sum_of_squares_and_keeps_all_at_t_minus_one():
    import numpy as np

    from peftmerge.merge.engine import fused

    g = torch.Generator().manual_seed(3)
    xs = torch.randn(3, 5000, generator=g)
    w = np.array([0.5, 2.0, -1.0], dtype=np.float32)
    out = np.empty(5000, dtype=np.float32)
    keep_all = np.full(3, -1.0, dtype=np.float32), np.zeros(3, dtype=np.int64)
    sq = fused.merge(xs.numpy(), *keep_all, 0, w, False, False, out)
    torch.testing.assert_close(torch.from_numpy(out), (torch.from_numpy(w)[:, None] * xs).sum(0), atol=1e-6, rtol=1e-6)
    assert sq == pytest.approx(float(torch.from_numpy(out).double().square().sum()), rel=1e-12)
    # a threshold above every entry keeps none; ties at t are kept only before tie_end
    sq = fused.merge(xs.numpy(), np.full(3, 99.0, dtype=np.float32), np.zeros(3, dtype=np.int64), 0, w, True, False, out)
    assert sq == 0.0 and not out.any()
    x = np.array([[0.5, -0.5, 0.5, 0.25]], dtype=np.float32)
    out = np.empty(4, dtype=np.float32)
    fused.merge(x, np.array([0.5], np.float32), np.array([12], np.int64), 10, np.ones(1, np.float32), False, False, out)
    assert out.tolist() == [0.5, -0.5, 0.0, 0.0]  # positions 10, 11 are before tie_end 12; 12 is not


def test_dare_stream_keeps_the_density_independently_per_input_and_seed():
    deltas = torch.ones(3, 1000, 1000)
    masks = ops.bernoulli_mask(deltas, [0.1, 0.5, 0.5], torch.Generator().manual_seed(0)).float()
    for m, d in zip(masks, [0.1, 0.5, 0.5]):
        assert abs(float(m.mean()) - d) < 4 * (d * (1 - d) / m.numel()) ** 0.5
    # inputs 1 and 2 share a density but not a stream: they agree on half the entries, as independent draws do
    assert abs(float((masks[1] == masks[2]).float().mean()) - 0.5) < 0.002
    again = ops.bernoulli_mask(deltas, 0.5, torch.Generator().manual_seed(0))
    other = ops.bernoulli_mask(deltas, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(again[1], masks[1].bool()) and abs(float((other[1] == again[1]).float().mean()) - 0.5) < 0.002
