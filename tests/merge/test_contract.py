"""The contract every registered merge method keeps in every space (parametrized over ``registry.names()`` and the
spaces, so a new method is covered as soon as it is registered): one input at weight 1 is itself; input order does
not matter; the LoRA output at full rank equals the method on the dense task vectors in the weight's own layout
(Linear, Embedding, GPT-2's Conv1D) and the ``--base`` path; in Core Space and KnOTS' space the LoRA output equals the
method on the representation the official algorithms build (dense SVDs of the stacked factors, written out here),
has rank <= the sum of the input ranks, and equals the ``--base`` path of the same space; outputs are finite or
refused."""

from __future__ import annotations

import json
import zlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import gpt2_adapter, make_adapter, tiny_gpt2, tiny_llama
from peftmerge.errors import PeftmergeError
from peftmerge.io.adapter import load_adapter
from peftmerge.merge import execute, registry
from peftmerge.io.meta import file_sha256
from peftmerge.merge.combine import combine

METHODS = registry.names()
SPACES = ("full", "core", "knots")
FULL_RANK = 32  # min(d_out, d_in) of every adapted module of the tiny models: no truncation


def identity(method: str) -> dict:
    """The parameters that make one input at weight 1 merge to itself, where the defaults (the papers') do not: each
    parameter's declared neutral value (density 1 keeps every entry, gamma 0 drops no outlier, ...)."""
    return {p.name: p.neutral for p in registry.get(method).params if p.neutral is not None}


# Methods that by their paper do not return a single input unchanged, and why (checked on what they do keep).
NOT_IDENTITY = {
    "pcb": "PCB clamps |dW| to its [1e-4, 1 - 1e-4] quantiles and weighs entries by min-max scores (0 for the "
           "smallest), so even one input at density 1 loses its extreme entries: checked to be within 5% in full "
           "space, 15% in Core Space and KnOTS' (a rank-4 core has 16 entries: its largest is clamped to the second)",
    "iso_c": "Iso-C replaces every singular value by their mean, so one input is itself only when its nonzero "
             "singular values are equal: checked on a rank-1 adapter",
}
# Methods whose result depends on the inputs' order by definition: those that draw random masks (they declare a
# seed), drawn per input position from the seed, so another order draws other masks (the same distribution).
ORDER_DEPENDENT = {m for m in METHODS if registry.get(m).random}


def write_grams(adapters, path):
    """A grams file as `peftmerge grams` writes it (every task, every linear module of the merge), with random
    positive-definite Gram matrices that depend on the task and module only."""
    tensors, loaded = {}, [load_adapter(a) for a in adapters]
    linear = {name: m.d_in for a in loaded for name, m in a.modules.items() if m.kind == "linear"}
    for a in loaded:
        for name, d_in in linear.items():
            g = torch.Generator().manual_seed(zlib.crc32(f"{a.task}/{name}".encode()))
            x = torch.randn(3 * d_in, d_in, generator=g)
            tensors[f"{a.task}/{name}"] = (x.T @ x / x.shape[0]).contiguous()
    meta = {"format": "peftmerge-grams", "tasks": [a.task for a in loaded], "data": {},
            "sha256": {a.task: file_sha256(a.file.path) for a in loaded}}
    save_file(tensors, str(path), metadata={"peftmerge": json.dumps(meta)})
    return path


def run(method, inputs, out, **kw):
    """combine() with the grams file a data-aware method needs beside the inputs' folder."""
    grams = None
    if registry.get(method).needs_grams:
        grams = write_grams(inputs, out.parent / f"grams-{out.name}.safetensors")
    return combine(inputs, out, method, grams=grams, progress=False, **kw)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Two adapters (Linear and Embedding modules, different ranks, rsLoRA) and the base model."""
    root = tmp_path_factory.mktemp("llama")
    a = make_adapter(root / "a", seed=1, r=4, alpha=8, targets=("q_proj", "v_proj", "embed_tokens"))
    b = make_adapter(root / "b", seed=2, r=2, alpha=3, targets=("q_proj", "o_proj", "embed_tokens"), use_rslora=True)
    tiny_llama(0).save_pretrained(str(root / "base"))
    return root, [a, b]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """Two adapters on GPT-2's Conv1D (fan_in_fan_out) and embedding layers, and the base model."""
    root = tmp_path_factory.mktemp("gpt2")
    a, b = gpt2_adapter(root / "a", 1, r=4), gpt2_adapter(root / "b", 2, r=3, targets=("c_attn", "c_proj", "wte"))
    tiny_gpt2().save_pretrained(str(root / "base"))
    return root, [a, b]


def weight_layout(adapter, name):
    m = adapter.modules[name]
    return adapter.delta(name).T if m.transposed else adapter.delta(name)


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("method", METHODS)
def test_one_input_at_weight_one_is_itself(llama, tmp_path, method, space):
    root, (a, _) = llama
    if method == "iso_c":
        a = make_adapter(tmp_path / "r1", seed=5, r=1, alpha=2, targets=("q_proj", "v_proj", "embed_tokens"))
    run(method, [a], tmp_path / "m", space=space, **identity(method))
    x, out = load_adapter(a), load_adapter(tmp_path / "m")
    assert set(out.modules) == set(x.modules)
    for k in x.modules:
        if method == "pcb":  # what it keeps: the clamped bulk
            bound = 0.05 if space == "full" else 0.15
            assert float((out.delta(k) - x.delta(k)).norm() / x.delta(k).norm()) < bound, NOT_IDENTITY[method]
            continue
        torch.testing.assert_close(out.delta(k), x.delta(k), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("method", METHODS)
def test_input_order_does_not_matter(llama, tmp_path, method, space):
    if method in ORDER_DEPENDENT:
        pytest.skip("its random masks are drawn per input position: another order draws other masks")
    _, (a, b) = llama
    run(method, [a, b], tmp_path / "x", weights=[0.7, 1.3], rank=None if registry.get(method).exact_concat
        else FULL_RANK, space=space)
    run(method, [b, a], tmp_path / "y", weights=[1.3, 0.7], rank=None if registry.get(method).exact_concat
        else FULL_RANK, space=space)
    x, y = load_adapter(tmp_path / "x"), load_adapter(tmp_path / "y")
    for k in x.modules:
        torch.testing.assert_close(x.delta(k), y.delta(k), atol=1e-5, rtol=1e-4)


def check_full_model(m, method, inputs, tmp_path, root, weights, given, expected):
    """The same merge with --base: W - W0 equals ``expected`` per module (LoRA-only methods are refused)."""
    if m.exact_concat or m.needs_grams:  # LoRA outputs only: refused with --base
        with pytest.raises(PeftmergeError, match="--base|full-model form"):
            run(method, inputs, tmp_path / "full", weights=weights, base=root / "base", **given)
        return
    run(method, inputs, tmp_path / "full", weights=weights, base=root / "base", **given)
    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    w0 = load_file(str(root / "base" / "model.safetensors"))
    for name, e in expected.items():
        torch.testing.assert_close(full[f"{name}.weight"] - w0[f"{name}.weight"], e, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_full_rank_lora_output_is_the_method_in_the_weights_layout_and_the_base_path(request, tmp_path, arch,
                                                                                    method):
    root, inputs = request.getfixturevalue(arch)
    m = registry.get(method)
    weights, given = [0.8, 1.1], {"seed": 3, "space": "full"}
    run(method, inputs, tmp_path / "lora", weights=weights, rank=None if m.exact_concat else FULL_RANK, **given)
    out, ins = load_adapter(tmp_path / "lora"), [load_adapter(a) for a in inputs]
    params = m.resolve(given, 2)
    grams = load_file(str(tmp_path / "grams-lora.safetensors")) if m.needs_grams else None
    expected = {}
    for name, mod in out.modules.items():
        # rows are the weight's rows (Conv1D and Embedding store dW^T); RegMean's least squares is over the layer's
        # inputs x (outputs x W^T), so it is defined on the (d_out, d_in) layout whatever the storage
        transpose = mod.transposed and not m.needs_grams
        stack = torch.stack([(x.delta(name).T if transpose else x.delta(name)) if name in x.modules
                             else torch.zeros(mod.shape[::-1] if transpose else mod.shape) for x in ins])
        g = [grams[f"{x.task}/{name}"] for x in ins] if grams and f"{ins[0].task}/{name}" in grams else None
        ctx = registry.Context(name, execute.module_generator(3, name), grams=g)
        merged = execute.dense(m, stack, torch.tensor(weights), params, ctx)
        expected[name] = merged.T if transpose != mod.transposed else merged  # the weight's layout
        got = out.delta(name).T if mod.transposed else out.delta(name)
        torch.testing.assert_close(got, expected[name], atol=2e-5, rtol=1e-4)
    check_full_model(m, method, inputs, tmp_path, root, weights, given, expected)


def representation(space: str, factors: list):
    """The inputs' representation as the official code builds it, from dense SVDs (float64): Core Space's cores
    U_B^T B_i A_i V_A (``get_core_matrices``) or KnOTS' rows S V_i^T of the SVD of [dW_1 .. dW_n] (``apply_svd``),
    zeros for an input that does not adapt the module (None), and the map of a merged one back to dW."""
    present = [i for i, f in enumerate(factors) if f is not None]
    bs = [factors[i][0].double() for i in present]
    as_ = [factors[i][1].double() for i in present]
    if space == "core":
        u_b = torch.linalg.svd(torch.cat(bs, 1), full_matrices=False)[0]
        vh_a = torch.linalg.svd(torch.cat(as_, 0), full_matrices=False)[2]
        stack = torch.zeros(len(factors), u_b.shape[1], vh_a.shape[0], dtype=torch.float64)
        for i, b, a in zip(present, bs, as_):
            stack[i] = u_b.T @ b @ a @ vh_a.T
        return stack, lambda merged: u_b @ merged.double() @ vh_a, vh_a
    u, s, vh = torch.linalg.svd(torch.cat([b @ a for b, a in zip(bs, as_)], 1), full_matrices=False)
    keep = s > 1e-6 * s[0]
    u, s, vh = u[:, keep], s[keep], vh[keep]
    stack = torch.zeros(len(factors), s.numel(), as_[0].shape[1], dtype=torch.float64)
    for i, v in zip(present, vh.split(as_[0].shape[1], dim=1)):
        stack[i] = s[:, None] * v
    return stack, lambda merged: u @ merged.double(), None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("space", ["core", "knots"])
@pytest.mark.parametrize("method", METHODS)
def test_in_space_lora_output_is_the_method_on_the_official_representation_and_the_base_path(request, tmp_path,
                                                                                              arch, space, method):
    root, inputs = request.getfixturevalue(arch)
    m = registry.get(method)
    weights, given = [0.8, 1.1], {"seed": 3, "space": space}
    report = run(method, inputs, tmp_path / "lora", weights=weights, **given)
    out, ins = load_adapter(tmp_path / "lora"), [load_adapter(a) for a in inputs]
    params = m.resolve(given, 2)
    grams = load_file(str(tmp_path / "grams-lora.safetensors")) if m.needs_grams else None
    expected = {}
    for name, mod in out.modules.items():
        transpose = mod.transposed and not m.needs_grams  # the weight's layout, as in full space
        factors = []
        for x in ins:
            a, b = x.scaled_factors(name) if name in x.modules else (None, None)
            factors.append(None if a is None else (a.T, b.T) if transpose else (b, a))
        stack, lift, vh_a = representation(space, factors)
        g = [grams[f"{x.task}/{name}"] for x in ins] if grams and f"{ins[0].task}/{name}" in grams else None
        if g is not None and vh_a is not None:  # Core Space's inputs are x V_A
            g = [(vh_a @ gi.double() @ vh_a.T).float() for gi in g]
        ctx = registry.Context(name, execute.module_generator(3, name), grams=g)
        merged = lift(execute.dense(m, stack.float(), torch.tensor(weights), params, ctx)).float()
        expected[name] = merged.T if transpose != mod.transposed else merged  # the weight's layout
        got = out.delta(name).T if mod.transposed else out.delta(name)
        torch.testing.assert_close(got, expected[name], atol=2e-5, rtol=1e-4)
        assert mod.rank <= sum(x.modules[name].rank for x in ins if name in x.modules)
    assert report["params"]["space"] == space
    check_full_model(m, method, inputs, tmp_path, root, weights, given, expected)


@pytest.mark.parametrize("method", METHODS)
def test_outputs_are_finite_or_refused(llama, tmp_path, method):
    root, (a, _) = llama
    big = make_adapter(tmp_path / "big", seed=3, alpha=1e11, targets=("q_proj", "v_proj", "embed_tokens"))
    with pytest.raises(PeftmergeError, match="weight nan is not a finite number"):
        run(method, [a, big], tmp_path / "nan", weights=[float("nan"), 1.0])
    for mode, kw in (("lora", {}), ("full", {"base": root / "base"})):
        out = tmp_path / mode
        try:
            run(method, [big, a], out, dtype="float16", **kw)
        except PeftmergeError as e:
            assert "float16" in str(e) or "--base" in str(e) or "full-model form" in str(e), str(e)
            assert not out.exists()
            continue
        for f in out.glob("*.safetensors"):
            assert all(torch.isfinite(t.float()).all() for t in load_file(str(f)).values()), (mode, f)
