"""Sparse merges of LoRA adapters straight from the factors (peftmerge.merge.sparse_lora): the merged matrix
is the one the reference compositions give on the dense task vectors, the one-pass top-k thresholds equal
radix select's, and the warm-started Krylov SVD reaches the exact SVD's truncation error."""

import pytest
import torch

from peftmerge.merge import execute, registry
from peftmerge.merge.engine import blocked, krylov, radix, sparse_lora, speculative
from peftmerge.merge.engine.blocks import Deltas

W = torch.tensor([0.7, 1.3, 0.4])


def _factors(d_out, d_in, r=6, n=3, seed=0, tied=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        b, a = torch.randn(d_out, r, generator=g), torch.randn(r, d_in, generator=g)
        if tied:  # few distinct values: many products tie in magnitude at the top-k threshold
            b, a = torch.randint(-2, 3, (d_out, r), generator=g).float(), torch.randint(-2, 3, (r, d_in), generator=g).float()
        out.append((b, a))
    return out


def test_factor_blocks_are_the_rows_of_the_dense_product():
    fac = _factors(300, 700)
    src = Deltas([("factors", f) for f in fac], None, (300, 700))
    for i, (b, a) in enumerate(fac):
        rows = [src.get(i, *src.span(j), torch.empty(*(lambda r: (r[1] - r[0], 700))(src.span(j))), None)
                for j in range(src.nblocks)]
        torch.testing.assert_close(torch.cat(rows), b @ a, atol=1e-5, rtol=1e-6)
    idx = torch.tensor([0, 5, 699, 700, 209_999])
    torch.testing.assert_close(src.sample(1, idx), (fac[1][0] @ fac[1][1]).reshape(-1)[idx], atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_band_select_equals_radix_select(tied):
    fac = _factors(500, 400, tied=tied)
    src = Deltas([("factors", f) for f in fac] + [None], None, (500, 400))
    for density in (0.05, 0.2, 0.61):
        ks = [int(density * src.numel)] * 4
        cuts, missed = radix.band_cuts(src, ks)
        assert missed == []
        assert cuts == radix.radix_cuts(src, ks)
        if tied:  # the test is about ties: some threshold must fall inside a run of equal magnitudes
            assert any(c.tie_end < src.numel for c in cuts[:3]) or density != 0.2


def test_a_missed_bracket_falls_back_to_radix(monkeypatch):
    fac = _factors(200, 300, seed=3)
    src = Deltas([("factors", f) for f in fac], None, (200, 300))
    ks = [int(0.2 * src.numel)] * 3
    monkeypatch.setattr(radix, "bracket", lambda src, i, k: (1e6, 1.5e6, 2e6) if i == 1 else (0.0, 1.0, 1e9))
    cuts, missed = radix.band_cuts(src, ks)
    assert missed == [1]
    assert radix.topk_cuts(src, ks) == radix.radix_cuts(src, ks)


@pytest.mark.parametrize("name,given", [("ties", {"density": 0.2}), ("magnitude_prune", {"density": 0.3}),
                                        ("dare_ties", {"density": 0.3}), ("ties", {"density": 0.5, "sign": "frequency"}),
                                        ("breadcrumbs", {"density": 0.2, "gamma": 0.05})])
@pytest.mark.parametrize("tied", [False, True])
def test_merge_from_factors_equals_the_reference_and_the_optimal_truncation(name, given, tied):
    shape = (2100, 260)  # several blocks of 4 x BLOCK elements (1008 rows)
    fac = _factors(*shape, tied=tied)
    m = registry.get(name)
    params = m.resolve(given, 3)
    deltas = torch.stack([b @ a for b, a in fac])
    ref = m.fn(deltas, W, params, registry.Context("m", torch.Generator().manual_seed(5)))
    merged = torch.empty(shape)
    a, b, err = sparse_lora.merge_to_rank(m.sparse, fac, shape, W, params, 8, torch.Generator().manual_seed(5),
                                          out=merged)
    torch.testing.assert_close(merged, ref, atol=2e-5, rtol=1e-6)
    s = torch.linalg.svdvals(ref.double())
    optimal = float(s[8:].square().sum().sqrt() / s.square().sum().sqrt())
    ours = float((ref.double() - b.double() @ a.double()).norm() / ref.double().norm())
    assert ours <= optimal + 1e-6
    assert err == pytest.approx(ours, abs=1e-6)


def test_warm_krylov_reaches_the_exact_truncation_error():
    # A sparsified merge of low-rank task vectors: full rank, a flat top spectrum over a noise bulk.
    g = torch.Generator().manual_seed(0)
    fac = [(torch.randn(700, 8, generator=g), torch.randn(8, 600, generator=g)) for _ in range(3)]
    m = registry.get("ties")
    merged = execute.dense(m, torch.stack([b @ a for b, a in fac]), torch.ones(3), m.resolve({}, 3))
    exact = merged.double()
    s = torch.linalg.svdvals(exact)
    for rank in (8, 24):
        v0 = krylov.start_block([a for _, a in fac], rank, generator=torch.Generator().manual_seed(1))
        a, b, err = krylov.warm_krylov(merged, v0, rank)
        optimal = float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())
        ours = float((exact - b.double() @ a.double()).norm() / exact.norm())
        assert optimal - 1e-6 <= ours <= optimal + 1e-6
        assert err == pytest.approx(ours, abs=1e-6)


def test_warm_krylov_from_a_poor_start_still_converges_or_falls_back_to_the_exact_svd():
    g = torch.Generator().manual_seed(2)
    m = torch.randn(150, 8, generator=g) @ torch.randn(8, 120, generator=g) + 0.1 * torch.randn(150, 120, generator=g)
    v0 = torch.linalg.qr(torch.randn(120, 12, generator=g)).Q  # unrelated to m's row space
    a, b, err = krylov.warm_krylov(m, v0, 8)
    s = torch.linalg.svdvals(m.double())
    optimal = float(s[8:].square().sum().sqrt() / s.square().sum().sqrt())
    assert float((m.double() - b.double() @ a.double()).norm() / m.double().norm()) <= optimal + 1e-6
    # sqrt(1 - e / ||m||^2) from float32 products: ~1e-7 / (2 err) off for small errors (merge_to_rank
    # recomputes those from m - BA)
    assert err == pytest.approx(optimal, abs=1e-5)


def test_products_on_the_block_workers_equal_the_plain_ones():
    g = torch.Generator().manual_seed(4)
    m, x, y = torch.randn(1100, 300, generator=g), torch.randn(300, 7, generator=g), torch.randn(1100, 7, generator=g)
    torch.testing.assert_close(krylov.products(m, x), m @ x, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(krylov.products(m, y, transpose=True), m.T @ y, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("ties,density", [(True, 0.2), (False, 0.3), (True, 0.61), (True, 1.0), (False, 0.0)])
def test_one_pass_merge_equals_the_two_pass_merge(tied, ties, density):
    shape = (900, 400)
    fac = _factors(*shape, tied=tied)
    src = Deltas([("factors", fac[0]), None, ("factors", fac[1]), ("factors", fac[2])], None, shape, 1 << 16)
    w, lam = [0.7, 0.5, 1.3, 0.4], 0.8
    spec = registry.Sparse("magnitude", "ties" if ties else "sum")
    two = blocked.merge(spec, src, w, {"density": density, "lambda": lam})
    v0 = torch.linalg.qr(torch.randn(400, 12, generator=torch.Generator().manual_seed(1))).Q
    one, y0 = torch.empty(shape), torch.empty(900, 12)
    ks = [int(density * src.numel)] * 4
    norm_sq = speculative.merge(src, ks, [lam * x for x in w], ties, False, one, v0, y0)
    torch.testing.assert_close(one, two, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(y0, one @ v0, atol=1e-4, rtol=1e-5)
    assert norm_sq == pytest.approx(float(two.double().square().sum()), rel=1e-6)
    if tied and density == 0.2:  # the thresholds fall inside runs of equal magnitudes
        assert any(c.tie_end < src.numel for c in radix.topk_cuts(src, ks) if c is not None)


def test_one_pass_merge_with_a_missed_bracket_falls_back_to_two_passes(monkeypatch):
    shape = (300, 200)
    fac = _factors(*shape, seed=4)
    m = registry.get("ties")
    params = m.resolve({"density": 0.2}, 3)
    ref = m.fn(torch.stack([b @ a for b, a in fac]), W, params, registry.Context("m"))
    monkeypatch.setattr(radix, "bracket", lambda src, i, k: (1e6, 1.5e6, 2e6) if i == 1 else (0.0, 1.0, 1e9))
    assert speculative.merge(Deltas([("factors", f) for f in fac], None, shape), [12_000] * 3, W.tolist(), True,
                             False, torch.empty(shape), torch.eye(200, 8), torch.empty(300, 8)) is None
    merged = torch.empty(shape)
    sparse_lora.merge_to_rank(m.sparse, fac, shape, W, params, 4, torch.Generator().manual_seed(0), out=merged)
    torch.testing.assert_close(merged, ref, atol=2e-5, rtol=1e-6)
