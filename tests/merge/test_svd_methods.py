"""TSV-Merge and Iso-C against transcriptions of their papers' algorithms (official code
AntoAndGar/task_singular_vectors and danielm1405/iso-merging, in ``tests/golden/official.py``), their invariants,
and the LoRA path: a combined adapter loads in PEFT and its dW is the method's merge of the dense dW_i."""

import pytest
import torch

from conftest import make_adapter
from golden import official
from peftmerge.io.adapter import load_adapter
from peftmerge.merge import execute, registry
from peftmerge.merge.combine import combine

WEIGHTS = torch.tensor([0.7, 1.3, 0.4, 1.0])


def run(name, deltas, weights, **given):
    m = registry.get(name)
    return execute.dense(m, deltas, weights, m.resolve(given, deltas.shape[0]), registry.Context("m"))


@pytest.fixture
def full_rank():
    torch.manual_seed(0)
    return torch.randn(4, 24, 40)


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_tsv_equals_the_papers_algorithm_on_full_rank_task_vectors(full_rank, alpha):
    torch.testing.assert_close(run("tsv", full_rank, WEIGHTS, **{"lambda": alpha}),
                               official.tsv(full_rank, WEIGHTS, alpha), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_iso_c_equals_the_papers_algorithm_on_full_rank_task_vectors(full_rank, alpha):
    torch.testing.assert_close(run("iso_c", full_rank, WEIGHTS, **{"lambda": alpha}),
                               official.iso_c(full_rank, WEIGHTS, alpha), rtol=1e-5, atol=1e-5)


def test_tsv_of_one_input_is_itself_and_of_orthogonal_tasks_is_their_sum(full_rank):
    torch.testing.assert_close(run("tsv", full_rank[:1], torch.ones(1)), full_rank[0], rtol=1e-5, atol=1e-5)
    # rank-3 task vectors on disjoint coordinate blocks: nothing to decorrelate, TSV = task arithmetic
    d = torch.zeros(3, 24, 40)
    for i in range(3):
        d[i, 8 * i:8 * i + 3, 10 * i:10 * i + 3] = torch.randn(3, 3)
    torch.testing.assert_close(run("tsv", d, WEIGHTS[:3]), run("task_arithmetic", d, WEIGHTS[:3]),
                               rtol=1e-5, atol=1e-5)


def test_low_rank_inputs_keep_only_their_nonzero_directions():
    """Rank-2 task vectors: each contributes exactly its 2 triplets (not k = 24/3 = 8 with 6 null ones),
    so TSV's output has rank 6 and Iso-C's singular values are the mean of the sum's 6 nonzero ones."""
    g = torch.Generator().manual_seed(1)
    d = torch.stack([torch.randn(24, 2, generator=g) @ torch.randn(2, 40, generator=g) for _ in range(3)])
    tsv = run("tsv", d, torch.ones(3))
    assert int((torch.linalg.svdvals(tsv) > 1e-4).sum()) == 6
    iso = run("iso_c", d, torch.ones(3))
    s_sum = torch.linalg.svdvals(d.sum(0))[:6]
    s_iso = torch.linalg.svdvals(iso)
    torch.testing.assert_close(s_iso[:6], s_sum.mean().expand(6), rtol=1e-4, atol=1e-5)
    assert float(s_iso[6:].max()) < 1e-4
    # same singular subspaces as the sum: projecting the sum on iso's column space loses nothing
    q = torch.linalg.svd(iso)[0][:, :6]
    torch.testing.assert_close(q @ (q.T @ d.sum(0)), d.sum(0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["tsv", "iso_c"])
def test_input_order_does_not_matter_and_other_tensors_are_averaged(full_rank, name):
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(run(name, full_rank, WEIGHTS), run(name, full_rank[perm], WEIGHTS[perm]),
                               rtol=1e-5, atol=1e-5)
    bias = full_rank[:, 0, :]
    torch.testing.assert_close(run(name, bias, WEIGHTS), (WEIGHTS[:, None] * bias).mean(0))


@pytest.mark.parametrize("name", ["tsv", "iso_c"])
def test_lora_merge_is_the_method_on_the_dense_task_vectors_exactly(tmp_path, name):
    """LoRA inputs take the factor-space path (never a dense dW): same dW as the dense definition, output
    rank = the sum of the input ranks (each input keeps its 4 nonzero directions)."""
    paths = [make_adapter(tmp_path / f"a{i}", seed=i + 1, r=4, alpha=8) for i in range(3)]
    assert registry.get(name).factored is not None
    report = combine([str(p) for p in paths], method=name, out=tmp_path / "out", progress=False)
    assert {row["rank_out"] for row in report["per_module"]} == {12}
    ins = [load_adapter(p) for p in paths]
    out = load_adapter(tmp_path / "out")
    for module in out.modules:
        dense = torch.stack([a.delta(module) for a in ins])
        torch.testing.assert_close(out.delta(module), run(name, dense, torch.ones(3)), rtol=1e-4, atol=1e-5)
