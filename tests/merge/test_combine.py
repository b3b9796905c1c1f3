"""combine() end to end on tiny adapters: exactness, invariants, PEFT round trips, heads, recipes."""

import json

import pytest
import torch
from peft import PeftModel
from peft.utils import merge_utils
from safetensors.torch import load_file, save_file

from conftest import make_adapter, tiny_llama
from peftmerge.io.adapter import load_adapter
from peftmerge.io.heads import load_head
from peftmerge.merge import execute
from peftmerge.merge.engine import krylov
from peftmerge.merge.methods import lowrank
from peftmerge.merge.combine import combine

IDS = torch.tensor([[1, 5, 9, 3, 7, 2], [4, 4, 8, 1, 0, 6]])


def peft_deltas(folder, model_seed=0, cls=None):
    """{module: dW} as PEFT itself computes it (get_delta_weight), independent of our reader."""
    model = PeftModel.from_pretrained(tiny_llama(model_seed, cls=cls, **({"num_labels": 3} if cls else {})), str(folder))
    out = {}
    for name, mod in model.base_model.model.named_modules():
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "scaling", {}):
            d = mod.get_delta_weight("default")
            out[name] = d.T if mod.__class__.__name__ == "Embedding" else d
    return out


def logits_with(deltas: dict, model_seed=0, cls=None):
    """Base model with dW added by hand to each module's weight."""
    model = tiny_llama(model_seed, cls=cls)
    with torch.no_grad():
        for name, d in deltas.items():
            w = model.get_submodule(name).weight
            w += d.T if "embed" in name else d
    return model(IDS).logits


def peft_logits(folder, model_seed=0, cls=None):
    return PeftModel.from_pretrained(tiny_llama(model_seed, cls=cls), str(folder)).eval()(IDS).logits


def test_task_arithmetic_is_exact_and_loads_in_peft(adapters, tmp_path):
    w = [0.5, -0.3, 1.2]
    combine(adapters, tmp_path / "m", "task_arithmetic", weights=w, lam=0.8, progress=False)
    ds = [peft_deltas(a) for a in adapters]
    expected = {}
    for d, wi in zip(ds, w):
        for k, v in d.items():
            expected[k] = expected.get(k, 0) + 0.8 * wi * v
    got = peft_deltas(tmp_path / "m")
    assert set(got) == set(expected)  # union of targets: o_proj only in one input
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(peft_logits(tmp_path / "m"), logits_with(expected), atol=1e-4, rtol=1e-4)


def test_ties_round_trip_equals_peft_merge_utils(adapters, tmp_path):
    # rank 32 = full rank of a 32x32 module, so the refactorization is exact and only the method is tested
    combine(adapters, tmp_path / "m", "ties", density=0.3, weights=[1, 0.5, 2], rank=32, space="full", progress=False)
    ds = [peft_deltas(a) for a in adapters]
    expected = {}
    for k in set().union(*ds):
        stack = [d.get(k, torch.zeros_like(next(x[k] for x in ds if k in x))) for d in ds]
        expected[k] = merge_utils.ties(stack, torch.tensor([1, 0.5, 2]), 0.3, "total")
    torch.testing.assert_close(peft_logits(tmp_path / "m"), logits_with(expected), atol=1e-4, rtol=1e-4)
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert report["relative_error_max"] < 1e-5


@pytest.mark.parametrize("method", ["task_arithmetic", "cat", "ties", "magnitude_prune", "dare_linear"])
def test_single_adapter_at_weight_one_merges_to_itself(tmp_path, method):
    a = make_adapter(tmp_path / "a", seed=4, r=4, alpha=16)
    params = {} if method in ("task_arithmetic", "cat") else {"density": 1.0}
    combine([a], tmp_path / "m", method, progress=False, **params)
    for k, d in peft_deltas(a).items():
        torch.testing.assert_close(peft_deltas(tmp_path / "m")[k], d, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(peft_logits(tmp_path / "m"), peft_logits(a), atol=1e-5, rtol=1e-4)
    assert json.loads((tmp_path / "m" / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "breadcrumbs", "pcb"])
def test_input_order_does_not_change_the_result(adapters, tmp_path, method):
    combine(adapters, tmp_path / "x", method, weights=[1, 2, 3], rank=32, progress=False)
    combine(adapters[::-1], tmp_path / "y", method, weights=[3, 2, 1], rank=32, progress=False)
    x, y = load_adapter(tmp_path / "x"), load_adapter(tmp_path / "y")
    for k in x.modules:
        torch.testing.assert_close(x.delta(k), y.delta(k), atol=1e-5, rtol=1e-4)


def test_factor_space_truncation_is_optimal(adapters, tmp_path):
    combine(adapters, tmp_path / "m", "task_arithmetic", rank=3, progress=False)
    out, ins = load_adapter(tmp_path / "m"), [load_adapter(a) for a in adapters]
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    for row in report["per_module"]:
        k = row["module"]
        exact = sum(a.delta(k) for a in ins if k in a.modules)
        u, s, vh = torch.linalg.svd(exact)
        best = (u[:, :3] * s[:3]) @ vh[:3]  # Eckart-Young optimum
        torch.testing.assert_close(out.delta(k), best, atol=1e-4, rtol=1e-3)
        assert out.modules[k].rank == min(3, sum(row["rank_in"]))
        opt_err = float((exact - best).norm() / exact.norm())
        assert row["relative_error"] == pytest.approx(opt_err, rel=1e-3, abs=1e-5)


def test_truncate_factors_matches_dense_svd():
    torch.manual_seed(0)
    b, a = torch.randn(50, 12), torch.randn(12, 30)
    a_k, b_k, s = lowrank.truncate_factors(b, a, 5)
    u, s_ref, vh = torch.linalg.svd(b @ a)
    torch.testing.assert_close(s, s_ref[:12], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(b_k @ a_k, (u[:, :5] * s_ref[:5]) @ vh[:5], atol=1e-3, rtol=1e-4)


def test_randomized_svd_recovers_low_rank_matrix():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(300, 8, generator=g) @ torch.randn(8, 200, generator=g)
    a, b, _ = krylov.randomized_svd(m, 8, generator=torch.Generator().manual_seed(1))
    assert float((m - b @ a).norm() / m.norm()) < 1e-5


def test_randomized_svd_is_near_optimal_on_a_flat_ties_spectrum():
    # A TIES merge of low-rank task vectors is full-rank with a flat spectrum: the case where subspace
    # iteration fell 0.3% short of the optimum. Block Krylov must reach the Eckart-Young error.
    from peftmerge.merge import registry

    g = torch.Generator().manual_seed(0)
    deltas = torch.stack([torch.randn(1000, 16, generator=g) @ torch.randn(16, 800, generator=g) for _ in range(3)])
    m = registry.get("ties")
    merged = execute.dense(m, deltas, torch.ones(3), m.resolve({}, 3))
    a, b, _ = krylov.randomized_svd(merged, 16, generator=torch.Generator().manual_seed(1))
    exact = merged.double()  # float64 errors: float32 norms of 800k entries wobble by ~1e-5
    s = torch.linalg.svdvals(exact)
    optimal = float(s[16:].square().sum().sqrt() / s.square().sum().sqrt())
    ours = float((exact - b.double() @ a.double()).norm() / exact.norm())
    assert optimal > 0.5  # flat: truncation loses most of the energy
    assert optimal * (1 - 1e-6) <= ours <= optimal * (1 + 1e-4)


def test_sparse_merge_reports_refactorization_error(adapters, tmp_path):
    report = combine(adapters, tmp_path / "m", "ties", space="full", progress=False)
    out = load_adapter(tmp_path / "m")
    ins = [load_adapter(a) for a in adapters]
    row = report["per_module"][0]
    k = row["module"]
    assert row["rank_out"] == sum(row["rank_in"])
    from peftmerge.merge import registry

    m = registry.get("ties")
    stack = torch.stack([a.delta(k) if k in a.modules else torch.zeros(out.modules[k].shape) for a in ins])
    exact = execute.dense(m, stack, torch.ones(3), m.resolve({}, 3))
    assert row["relative_error"] == pytest.approx(float((exact - out.delta(k)).norm() / exact.norm()), rel=1e-3)


def test_dare_is_reproducible_with_seed(adapters, tmp_path):
    combine(adapters, tmp_path / "x", "dare_ties", seed=5, progress=False)
    combine(adapters, tmp_path / "y", "dare_ties", seed=5, progress=False)
    combine(adapters, tmp_path / "z", "dare_ties", seed=6, progress=False)
    x, y, z = (load_file(str(tmp_path / n / "adapter_model.safetensors")) for n in "xyz")
    assert all(torch.equal(x[k], y[k]) for k in x)
    assert not all(torch.equal(x[k], z[k]) for k in x)


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_modules_on_parallel_threads_give_the_sequential_result(adapters, tmp_path, method):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # one module at a time
        combine(adapters, tmp_path / "one", method, rank=4, progress=False)
        torch.set_num_threads(2)  # a module per thread
        combine(adapters, tmp_path / "two", method, rank=4, progress=False)
    finally:
        torch.set_num_threads(before)
    one, two = (load_file(str(tmp_path / n / "adapter_model.safetensors")) for n in ("one", "two"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_rank_pattern_alpha_pattern_and_rslora_scalings(tmp_path):
    a = make_adapter(tmp_path / "a", seed=1, r=4, alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 6})
    b = make_adapter(tmp_path / "b", seed=2, r=9, alpha=6, use_rslora=True)
    la, lb = load_adapter(a), load_adapter(b)
    assert la.modules["model.layers.0.self_attn.v_proj"].scaling == pytest.approx(3.0)
    assert la.modules["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(2.0)
    assert lb.modules["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(2.0)  # 6 / sqrt(9)
    combine([a, b], tmp_path / "m", "task_arithmetic", progress=False)
    expected = {k: peft_deltas(a)[k] + peft_deltas(b)[k] for k in peft_deltas(a)}
    torch.testing.assert_close(peft_logits(tmp_path / "m"), logits_with(expected), atol=1e-4, rtol=1e-4)
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert cfg["r"] in (11, 13) and cfg["rank_pattern"]  # q: 4 + 9, v: 2 + 9


def test_embedding_lora_merges(tmp_path):
    a = make_adapter(tmp_path / "a", seed=1, targets=("embed_tokens", "q_proj"))
    b = make_adapter(tmp_path / "b", seed=2, targets=("embed_tokens", "q_proj"), r=3, alpha=3)
    combine([a, b], tmp_path / "m", "task_arithmetic", weights=[1.0, 0.5], progress=False)
    da, db = peft_deltas(a), peft_deltas(b)
    expected = {k: da[k] + 0.5 * db[k] for k in da}
    assert "model.embed_tokens" in expected
    torch.testing.assert_close(peft_logits(tmp_path / "m"), logits_with(expected), atol=1e-4, rtol=1e-4)


def test_bare_safetensors_needs_alpha(tmp_path):
    a = make_adapter(tmp_path / "a", seed=1, r=4, alpha=8)
    bare = tmp_path / "bare" / "task_a.safetensors"
    bare.parent.mkdir()
    save_file(load_file(str(a / "adapter_model.safetensors")), str(bare))
    from peftmerge.errors import PeftmergeError

    with pytest.raises(PeftmergeError, match="no adapter_config.json.*--alpha"):
        combine([bare], tmp_path / "m", "task_arithmetic", progress=False)
    combine([bare], tmp_path / "m", "task_arithmetic", alpha=8, progress=False)
    torch.testing.assert_close(peft_logits(tmp_path / "m"), peft_logits(a), atol=1e-5, rtol=1e-4)


def test_global_granularity_trims_over_the_whole_adapter(adapters, tmp_path):
    """granularity=global equals TIES with the top-k taken over all modules at once (official TIES code)."""
    combine(adapters, tmp_path / "g", "ties", density=0.2, granularity="global", rank=32, progress=False)
    ins, out = [load_adapter(a) for a in adapters], load_adapter(tmp_path / "g")
    names = sorted(out.modules)
    stacks = [torch.stack([a.delta(k) if k in a.modules else torch.zeros(out.modules[k].shape) for a in ins])
              for k in names]
    flat = torch.cat([s.reshape(3, -1) for s in stacks], dim=1)
    keep = merge_utils.magnitude_based_pruning  # per input over the flat adapter, PEFT's top-k
    trimmed = torch.stack([keep(flat[i], 0.2) for i in range(3)])
    merged = merge_utils.disjoint_merge(trimmed, merge_utils.calculate_majority_sign_mask(trimmed, "total"))
    offset = 0
    for k, s in zip(names, stacks):
        expected = merged[offset: offset + s[0].numel()].reshape(s[0].shape)
        offset += s[0].numel()
        torch.testing.assert_close(out.delta(k), expected, atol=1e-5, rtol=1e-4)


def test_classification_heads_are_kept_per_task(tmp_path):
    from transformers import LlamaForSequenceClassification as Cls

    a = make_adapter(tmp_path / "sst2", seed=1, task_type="SEQ_CLS", cls=Cls)
    b = make_adapter(tmp_path / "agnews", seed=2, task_type="SEQ_CLS", cls=Cls)
    combine([a, b], tmp_path / "m", "task_arithmetic", progress=False)
    meta = json.loads((tmp_path / "m" / "peftmerge.json").read_text())
    assert set(meta["heads"]) == {"sst2", "agnews"}
    da, db = peft_deltas(a, cls=Cls, model_seed=0), peft_deltas(b, cls=Cls)
    for task, src in (("sst2", a), ("agnews", b)):
        base = tiny_llama(0, cls=Cls, num_labels=3)
        merged = PeftModel.from_pretrained(base, str(tmp_path / "m")).eval()
        load_head(merged, tmp_path / "m", task)
        ref = tiny_llama(0, cls=Cls, num_labels=3)
        with torch.no_grad():
            for k in da:
                ref.get_submodule(k).weight += da[k] + db[k]
            head = load_file(str(src / "adapter_model.safetensors"))
            ref.score.weight.copy_(head["base_model.model.score.weight"])
        torch.testing.assert_close(merged(IDS).logits, ref(IDS).logits, atol=1e-4, rtol=1e-4)


def test_yaml_recipe(adapters, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "merge_method: ties\nmodels:\n"
        f"  - model: {adapters[0]}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        f"  - model: {adapters[1]}\n    parameters: {{weight: 1.5, density: 0.3}}\n"
        "parameters: {lambda: 0.9}\ndtype: bfloat16\n"
    )
    report = combine(config=recipe, out=tmp_path / "m", progress=False)
    assert report["method"] == "ties" and report["weights"] == [0.5, 1.5]
    assert report["params"]["models"] == [{"weight": 0.5, "density": 0.5}, {"weight": 1.5, "density": 0.3}]
    assert report["params"]["lambda"] == 0.9 and report["params"]["dialect"] == "mergekit"
    state = load_file(str(tmp_path / "m" / "adapter_model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    card = (tmp_path / "m" / "README.md").read_text()
    assert "- merge\n" in card.split("---")[1] and "- ties\n" in card.split("---")[1]  # tags
    assert report["inputs"][0]["sha256"] in card


def test_keys_with_an_adapter_name_read_the_same(tmp_path):
    a = make_adapter(tmp_path / "a", seed=1)
    named = tmp_path / "named"
    named.mkdir()
    (named / "adapter_config.json").write_text((a / "adapter_config.json").read_text())
    state = load_file(str(a / "adapter_model.safetensors"))
    save_file({k.replace(".weight", ".sst2.weight"): v for k, v in state.items()},
              str(named / "adapter_model.safetensors"))
    plain, with_name = load_adapter(a), load_adapter(named)
    assert set(plain.modules) == set(with_name.modules)
    for k in plain.modules:
        torch.testing.assert_close(plain.delta(k), with_name.delta(k))


def test_dora_is_refused(tmp_path):
    from peftmerge.errors import PeftmergeError

    d = make_adapter(tmp_path / "d", seed=1, use_dora=True)
    with pytest.raises(PeftmergeError, match="DoRA"):
        combine([d], tmp_path / "m", "ties", progress=False)
    assert not (tmp_path / "m").exists()


def test_krylov_is_exact_on_a_low_rank_matrix_from_a_wider_start_block():
    """m of rank 8, start block of 16 columns: the next Krylov block is partly inside the basis already;
    rounding must not enter the basis as non-orthogonal columns (if it did, the true error could be large
    while the Ritz estimate said 0). The estimate sqrt(1 - captured/total) is only good to ~sqrt(1e-7) near 0."""
    g = torch.Generator().manual_seed(0)
    m = torch.randn(300, 8, generator=g) @ torch.randn(8, 200, generator=g)
    v0 = torch.linalg.qr(torch.randn(200, 16, generator=g)).Q
    a, b, err = krylov.warm_krylov(m, v0, 8)
    assert err < 1e-3 and float((m - b @ a).norm() / m.norm()) < 1e-5
