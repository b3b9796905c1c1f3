"""Full merged models (`combine --base`): LoRA and full fine-tuned inputs, sharding, dtype, atomicity, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import make_adapter, tiny_llama
from peft.utils import merge_utils
from safetensors.torch import load_file

from peftmerge.cli.main import main
from peftmerge.errors import PeftmergeError
from peftmerge.merge import execute, full_model, registry
from peftmerge.merge.combine import combine

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 127]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def load_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def state(folder) -> dict[str, torch.Tensor]:
    """All tensors of a saved model folder (sharded or not)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture
def base(tmp_path):
    folder = tmp_path / "base"
    tiny_llama(0).save_pretrained(str(folder))
    return folder


def fine_tune(folder, seed, dtype=torch.float32, scale=0.02):
    """A 'full fine-tune' of the base: every parameter perturbed."""
    model = tiny_llama(0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    model.to(dtype).save_pretrained(str(folder))
    return folder


@pytest.fixture
def fine_tunes(tmp_path):
    return [fine_tune(tmp_path / f"ft{i}", seed=10 + i) for i in range(3)]


@pytest.mark.parametrize("method,kw", [("task_arithmetic", {"weights": [1.0, 0.5, 2.0]}),
                                       ("ties", {"density": 0.3, "weights": [1.0, 0.7, 1.3]})])
def test_lora_inputs_equal_merge_and_unload(tmp_path, base, method, kw):
    """Full output == PEFT's merge_and_unload of the merged adapter (at full rank), incl. an embedding LoRA."""
    from peft import PeftModel

    inputs = [make_adapter(tmp_path / "a", seed=1, r=4, alpha=8, targets=("q_proj", "v_proj", "embed_tokens")),
              make_adapter(tmp_path / "b", seed=2, r=2, alpha=4, targets=("q_proj", "o_proj", "down_proj")),
              make_adapter(tmp_path / "c", seed=3, r=6, alpha=3, use_rslora=True)]
    rank = None if method == "task_arithmetic" else 128  # full rank: the adapter holds the merged dW exactly
    combine(inputs, tmp_path / "adapter", method, rank=rank, space="full", progress=False, **kw)
    report = combine(inputs, tmp_path / "full", method, base=base, progress=False, **kw)

    expected = logits(PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "adapter")).merge_and_unload())
    merged = load_model(tmp_path / "full")
    torch.testing.assert_close(logits(merged), expected, atol=2e-5, rtol=1e-4)
    assert report["tensors_merged"] == 2 * 4 + 1  # q, v, o, down in 2 layers + embeddings
    assert not torch.allclose(expected, logits(tiny_llama(0)), atol=1e-3)  # the merge did change the model


def test_dare_lora_inputs_use_the_adapter_masks(tmp_path, base, adapters):
    """DARE masks are seeded by module name, so the full merge equals the dare_ties adapter merged in."""
    from peft import PeftModel

    combine(adapters, tmp_path / "adapter", "dare_ties", density=0.5, seed=3, rank=128, space="full", progress=False)
    combine(adapters, tmp_path / "full", "dare_ties", density=0.5, seed=3, base=base, progress=False)
    expected = logits(PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "adapter")).merge_and_unload())
    torch.testing.assert_close(logits(load_model(tmp_path / "full")), expected, atol=2e-5, rtol=1e-4)


def _peft_reference(method, deltas, weights, params):
    """PEFT's merge_utils on the same task vectors (an independent implementation)."""
    tensors = list(deltas)
    if method == "task_arithmetic":
        return params["lambda"] * merge_utils.task_arithmetic(tensors, weights)
    if method == "ties":
        return params["lambda"] * merge_utils.ties(tensors, weights, params["density"], params["sign"])
    return params["lambda"] * merge_utils.magnitude_prune(tensors, weights, params["density"])


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {"lam": 0.8}),
    ("ties", {"density": 0.4, "sign": "frequency"}),
    ("magnitude_prune", {"density": 0.3}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1}),
    ("dare_linear", {"density": 0.6, "seed": 5}),
    ("pcb", {"density": 0.3}),
])
def test_full_checkpoints_are_base_plus_merged_task_vectors(tmp_path, base, fine_tunes, method, params):
    weights = [1.0, 0.5, 2.0]
    combine(fine_tunes, tmp_path / "out", method, weights=weights, base=base, progress=False, **params)
    theta0 = load_file(str(base / "model.safetensors"))
    thetas = [load_file(str(f / "model.safetensors")) for f in fine_tunes]
    out = state(tmp_path / "out")
    assert set(out) == set(theta0)
    m = registry.get(method)
    resolved = m.resolve({"lambda": params.get("lam"), **{k: v for k, v in params.items() if k != "lam"}}, 3)
    w = torch.tensor(weights)
    for name, w0 in theta0.items():
        deltas = torch.stack([t[name] - w0 for t in thetas])
        if method in ("task_arithmetic", "ties", "magnitude_prune"):
            merged = _peft_reference(method, deltas, w, resolved)
        else:  # same registered method, checks the streaming plumbing (layout, seeding, W0 + dW)
            module = name.removesuffix(".weight")
            ctx = registry.Context(module, execute.module_generator(resolved.get("seed", 0), module))
            merged = execute.dense(m, deltas, w, resolved, ctx)
        torch.testing.assert_close(out[name], w0 + merged, atol=1e-6, rtol=1e-5, msg=name)


def test_mixed_lora_and_full_inputs(tmp_path, base, fine_tunes):
    a = make_adapter(tmp_path / "a", seed=1, targets=("q_proj",))
    combine([a, fine_tunes[0]], tmp_path / "out", "task_arithmetic", base=base, progress=False)
    theta0, theta1 = load_file(str(base / "model.safetensors")), load_file(str(fine_tunes[0] / "model.safetensors"))
    from peftmerge.io.adapter import load_adapter

    lora = load_adapter(a)
    out = state(tmp_path / "out")
    for name, w0 in theta0.items():
        module = name.removesuffix(".weight")
        expected = theta1[name] + (lora.delta(module) if module in lora.modules else 0)
        torch.testing.assert_close(out[name], expected, atol=1e-6, rtol=1e-5)


def test_sharded_output_loads_and_matches(tmp_path, base, fine_tunes):
    combine(fine_tunes, tmp_path / "one", "ties", base=base, progress=False)
    combine(fine_tunes, tmp_path / "sharded", "ties", base=base, shard_size="20KB", progress=False)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    for f in files:  # every shard within the limit unless it holds a single larger tensor
        shard = load_file(str(tmp_path / "sharded" / f))
        assert len(shard) == 1 or sum(t.numel() * t.element_size() for t in shard.values()) <= 20_000
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
    torch.testing.assert_close(logits(load_model(tmp_path / "sharded")), logits(load_model(tmp_path / "one")),
                               atol=0, rtol=0)
    for name in ("config.json", "generation_config.json", "README.md", "merge_report.json"):
        assert (tmp_path / "sharded" / name).exists()
    assert "merged-model" in (tmp_path / "sharded" / "peftmerge.json").read_text()
    card = (tmp_path / "sharded" / "README.md").read_text()  # a local base: named in the text, not the metadata
    assert "base_model" not in card.split("---")[1] and "local path" in card and "library_name: transformers" in card


def test_dtype_rule(tmp_path):
    base = tmp_path / "base"
    tiny_llama(0).to(torch.bfloat16).save_pretrained(str(base))
    fts = [fine_tune(tmp_path / f"ft{i}", seed=i, dtype=torch.bfloat16) for i in range(2)]
    combine(fts, tmp_path / "default", "task_arithmetic", base=base, progress=False)
    combine(fts, tmp_path / "f32", "task_arithmetic", base=base, dtype="float32", progress=False)
    default, f32 = state(tmp_path / "default"), state(tmp_path / "f32")
    theta0 = load_file(str(base / "model.safetensors"))
    thetas = [load_file(str(f / "model.safetensors")) for f in fts]
    for name, w0 in theta0.items():
        exact = w0.float() + sum(t[name].float() - w0.float() for t in thetas)  # computed in float32
        assert default[name].dtype == torch.bfloat16 and f32[name].dtype == torch.float32
        torch.testing.assert_close(f32[name], exact, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(default[name], f32[name].to(torch.bfloat16), atol=0, rtol=0)
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"
    assert json.loads((tmp_path / "default" / "config.json").read_text())["dtype"] == "bfloat16"


def test_interrupted_merge_leaves_nothing(tmp_path, base, fine_tunes, monkeypatch):
    calls = []
    real = full_model.merge_tensor

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated Ctrl-C")
        return real(*args, **kw)

    monkeypatch.setattr(full_model, "merge_tensor", flaky)
    with pytest.raises(KeyboardInterrupt):
        combine(fine_tunes, tmp_path / "out", "ties", base=base, shard_size="20KB", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_full_model_and_bad_inputs(tmp_path, base, fine_tunes):
    run = CliRunner().invoke
    ok = run(main, ["combine", *map(str, fine_tunes), "--base", str(base), "-o", str(tmp_path / "m"), "--method", "ties",
                    "--density", "0.3"])
    assert ok.exit_code == 0, ok.output
    assert "3 inputs" in ok.output and (tmp_path / "m" / "model.safetensors").exists()

    def fails(args, match):
        r = run(main, ["combine", *map(str, args)])
        assert r.exit_code == 2, r.output
        assert match in r.output and "Traceback" not in r.output
        assert len(r.output.strip().splitlines()) == 1

    ft = str(fine_tunes[0])
    fails([ft, fine_tunes[1], "-o", tmp_path / "x"], "full model checkpoint, not a LoRA adapter")
    fails([ft, "--base", tmp_path / "nope", "-o", tmp_path / "x"], "no such file or directory")
    a = make_adapter(tmp_path / "a", seed=1)
    fails([ft, "--base", a, "-o", tmp_path / "x"], "not a full model folder")
    fails([ft, "--base", base, "--rank", 4, "-o", tmp_path / "x"], "has no rank")
    fails([ft, "--base", base, "--method", "cat", "-o", tmp_path / "x"], "no full-model form")
    fails([ft, "--base", base, "--shard-size", "big", "-o", tmp_path / "x"], "is not a size")
    fails([a, "--shard-size", "1GB", "-o", tmp_path / "x"], "--shard-size applies to full merged models")
    fails([ft, "--base", base, "-o", tmp_path / "m"], "already exists")
    fails([ft, "--base", base, "-o", base, "--overwrite"], "is an input")
    big = tmp_path / "bigvocab"
    tiny_llama(0, vocab_size=130).save_pretrained(str(big))
    fails([big, "--base", base, "-o", tmp_path / "x"], "has shape [130, 32] but the base model's is [128, 32]")
    short = tmp_path / "one-layer"
    tiny_llama(0, num_hidden_layers=1).save_pretrained(str(short))
    fails([a, "--base", short, "-o", tmp_path / "x"], "adapts model.layers.1.self_attn.q_proj, but the base model")
    assert not (tmp_path / "x").exists()


def test_nan_in_a_fine_tune_is_refused(tmp_path, base, fine_tunes):
    bad = tmp_path / "bad"
    model = tiny_llama(0)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(str(bad))
    with pytest.raises(PeftmergeError, match="bad: tensor model.layers.0.mlp.up_proj.weight contains NaN"):
        combine([fine_tunes[0], bad], tmp_path / "out", "task_arithmetic", base=base, progress=False)
    assert not (tmp_path / "out").exists()


def test_recipe_with_base_model_writes_a_full_model(tmp_path, base, fine_tunes):
    import yaml

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.4},
        "models": [{"model": str(f), "parameters": {"weight": 1.0}} for f in fine_tunes]}))
    combine(out=tmp_path / "from-recipe", config=recipe, progress=False)
    combine(fine_tunes, tmp_path / "direct", "ties", density=0.4, base=base, progress=False)
    a, b = state(tmp_path / "from-recipe"), state(tmp_path / "direct")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
