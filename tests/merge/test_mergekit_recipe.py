"""YAML recipes in mergekit's dialect: its methods' math and its settings (gradients, filters, types) against
mergekit 0.1.5's own functions, adapter outputs against mergekit's merge of the same task vectors, and every
refusal as one line."""

from __future__ import annotations

import mergekit  # noqa: F401  (a test dependency: fail loudly without it)
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import make_adapter, tiny_llama
from mergekit.config import ParameterSetting, evaluate_setting
from mergekit.merge_methods import merge_state_dicts
from mergekit.merge_methods import registry as mk_registry
from pydantic import TypeAdapter

from peftmerge.cli.main import main
from peftmerge.errors import PeftmergeError
from peftmerge.io.adapter import load_adapter
from peftmerge.merge import mergekit_methods as mk
from peftmerge.merge.combine import combine
from peftmerge.merge.mergekit_recipe import evaluate, layer_positions


def _parsed(setting):
    """The setting as mergekit's config parser hands it to evaluate_setting."""
    return TypeAdapter(ParameterSetting).validate_python(setting)


def _theirs(method, inputs, base, **params):
    return merge_state_dicts([{"w": base}] + [{"w": x} for x in inputs], method, base=0, parameters=params)["w"]


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("shape", [(6, 10), (17,)])
@pytest.mark.parametrize("density,normalize,rescale", [(0.4, True, False), (0.55, False, True), (1.5, True, True),
                                                       (0.0, False, False), (0.01, True, True)])
def test_task_vector_methods_equal_mergekits(method, shape, density, normalize, rescale):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(*shape, generator=g)
    inputs = [base + torch.randn(*shape, generator=g) for _ in range(3)]
    weights = [0.7, -0.2, 0.5]
    p = {"density": [density, 0.6, density], "normalize": normalize, "rescale": rescale, "lambda": 0.8,
         "gamma": [0.1, 0.01, 0.2]}
    deltas = torch.stack([x - base for x in inputs])
    ours = base + mk.merge_delta(mk.METHODS[method], deltas, weights, p)
    extra = {"gamma": p["gamma"]} if "breadcrumbs" in method else {}
    theirs = _theirs(method, inputs, base, weight=weights, density=p["density"], normalize=normalize,
                     rescale=rescale, **{"lambda": 0.8}, **extra)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_methods_at_density_1_equal_mergekits(method):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(5, 9, generator=g)
    inputs = [base + torch.randn(5, 9, generator=g) for _ in range(3)]
    p = {"density": [1.0] * 3, "normalize": True, "rescale": True, "lambda": 1.3, "epsilon": [0.1] * 3}
    ours = base + mk.merge_delta(mk.METHODS[method], torch.stack([x - base for x in inputs]), [1.0, 0.4, -0.3], p)
    theirs = _theirs(method, inputs, base, weight=[1.0, 0.4, -0.3], density=1.0, normalize=True, rescale=True,
                     **{"lambda": 1.3})
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("shape", [(6, 10), (17,)])
def test_random_methods_equal_mergekits_for_the_same_draw(monkeypatch, method, rescale, shape):
    """DARE and DELLA draw their masks with torch.bernoulli (mergekit from the global generator, peftmerge from a
    seeded one). Given the same uniform numbers for every draw, both must ask for the same keep probabilities
    and give the same merge: the whole algorithm is compared exactly, the randomness only in distribution."""
    uniforms = torch.rand(8, *shape, generator=torch.Generator().manual_seed(11))
    calls = []

    def bernoulli(p, generator=None, **_):
        calls.append(p.clone())
        return (uniforms[len(calls) - 1].reshape(p.shape) < p).to(p.dtype)

    g = torch.Generator().manual_seed(5)
    base = torch.randn(*shape, generator=g)
    inputs = [base + torch.randn(*shape, generator=g) for _ in range(3)]
    weights, density, eps = [0.7, -0.2, 0.5], [0.4, 0.65, 0.5], [0.2, 0.1, 0.3]
    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    p = {"density": density, "normalize": True, "rescale": rescale, "lambda": 0.8, "epsilon": eps}
    ours = base + mk.merge_delta(mk.METHODS[method], torch.stack([x - base for x in inputs]), weights, p)
    ours_p, calls[:] = list(calls), []
    extra = {"epsilon": eps} if "della" in method else {}
    theirs = _theirs(method, inputs, base, weight=weights, density=density, normalize=True, rescale=rescale,
                     **{"lambda": 0.8}, **extra)
    assert len(ours_p) == len(calls) == 3
    for a, b in zip(ours_p, calls):
        torch.testing.assert_close(a.reshape(b.shape), b)  # the same keep probabilities
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_equals_mergekits(normalize):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 6, generator=g)
    inputs = [base + torch.randn(4, 6, generator=g) for _ in range(3)]
    ours = mk.linear_sum(base, torch.stack([x - base for x in inputs]), [1.0, 0.3, 0.5], normalize)
    theirs = merge_state_dicts([{"w": x} for x in inputs], "linear",
                               parameters={"weight": [1.0, 0.3, 0.5], "normalize": normalize})["w"]
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


SETTINGS = [0.3, "1e-3", [0, 0.3, 0.7, 1], [1, 0.7, 0.1], ["1e-5", "1e-3"], [2.0],
            [{"filter": "mlp", "value": 0.5}, {"value": 0}], {"filter": "embed", "value": [0.1, 0.9]},
            [{"filter": "self_attn", "value": [0.2, 0.8]}, {"filter": "*", "value": 0.4}],
            [{"filter": "nothing-matches", "value": 1.0}], []]


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
def test_settings_evaluate_as_mergekits(setting):
    key = mk.Key("density", float, 1.0, True)
    validate = mk_registry.get("ties").spec.parameters[-1].validate  # density: float
    for tensor in ["model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight", "model.layers.3.self_attn.q"]:
        for t in [0.0, 1 / 3, 0.5, 2 / 3, 1.0]:
            theirs = evaluate_setting(tensor, _parsed(setting), t, validate=validate)
            assert evaluate(setting, key, tensor, t, "x") == pytest.approx(theirs), (tensor, t)


@pytest.mark.parametrize("setting", [True, "false", [False, True], [0, 1, 1], [{"filter": "mlp", "value": "yes"}]],
                         ids=str)
def test_boolean_settings_evaluate_as_mergekits(setting):
    key = mk.Key("normalize", bool, True)
    validate = next(p for p in mk_registry.get("ties").spec.parameters if p.name == "normalize").validate
    for t in [0.0, 0.4, 0.5, 1.0]:
        assert evaluate(setting, key, "model.layers.1.mlp.x", t, "x") is evaluate_setting(
            "model.layers.1.mlp.x", _parsed(setting), t, validate=validate)


def test_layer_positions_are_mergekits_t():
    names = ["model.embed_tokens.weight"] + [f"model.layers.{i}.mlp.up_proj.weight" for i in range(4)] + \
            ["model.norm.weight", "lm_head.weight", "vision.blocks.0.w", "vision.blocks.1.w"]
    t = layer_positions(names)
    assert [t[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(4)] == [0, 1 / 3, 2 / 3, 1]
    assert t["model.embed_tokens.weight"] == t["model.norm.weight"] == t["lm_head.weight"] == 0
    assert t["vision.blocks.0.w"] == 0 and t["vision.blocks.1.w"] == 1  # its own layer count


# --- adapter outputs -----------------------------------------------------------------------------------------

def _recipe(path, method, models, params=None, **top):
    cfg = {"merge_method": method, "models": models, **top}
    if params:
        cfg["parameters"] = params
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("method,params", [
    ("ties", {"density": 0.5}), ("linear", {}), ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.05}),
    ("task_arithmetic", {"normalize": True, "lambda": 0.7}), ("della", {"density": 1.0})])
def test_adapter_output_is_mergekits_merge_of_the_task_vectors(adapters, tmp_path, method, params):
    """No base_model: the merged adapter's dW (at full rank) is mergekit's merge of the inputs' dW = s B A."""
    weights = [1.0, 0.3, 2.0]
    models = [{"model": str(a), "parameters": {"weight": w}} for a, w in zip(adapters, weights)]
    recipe = _recipe(tmp_path / "r.yml", method, models, params, rank=64)
    combine(config=recipe, out=tmp_path / "m", progress=False)
    merged = load_adapter(tmp_path / "m")
    ins = [load_adapter(a) for a in adapters]
    for name in merged.modules:
        zero = torch.zeros(merged.modules[name].shape)
        deltas = [a.delta(name) if name in a.modules else zero for a in ins]
        if method == "linear":  # the weighted average of the models: here of their task vectors
            theirs = merge_state_dicts([{"w": d} for d in deltas], "linear", parameters={"weight": weights})["w"]
        else:
            theirs = merge_state_dicts([{"w": zero}] + [{"w": d} for d in deltas], method, base=0,
                                       parameters={"weight": weights, **params})["w"]
        torch.testing.assert_close(merged.delta(name), theirs, atol=1e-5, rtol=1e-4, msg=name)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(result, *fragments):
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_adapter_output_refusals(adapters, tmp_path):
    models = [{"model": str(a), "parameters": {"weight": 0.5}} for a in adapters[:2]]
    out = tmp_path / "m"
    r = _recipe(tmp_path / "grad.yml", "ties", [{**models[0], "parameters": {"weight": [0, 1]}}, models[1]])
    refused(invoke("combine", "--config", r, "-o", out), "grad.yml", "gradients", "--base")
    r = _recipe(tmp_path / "tok.yml", "ties", models, tokenizer_source="base")
    refused(invoke("combine", "--config", r, "-o", out), "tok.yml", "tokenizer_source", "full merged models")
    r = _recipe(tmp_path / "lin.yml", "linear", models, {"normalize": False})  # 0.5 + 0.5 = 1: fine
    assert invoke("combine", "--config", r, "-o", tmp_path / "ok", "--quiet").exit_code == 0
    r = _recipe(tmp_path / "lin2.yml", "linear", [models[0], {**models[1], "parameters": {"weight": 2.0}}],
                {"normalize": False})
    refused(invoke("combine", "--config", r, "-o", out), "lin2.yml", "scales the base model", "--base")
    emb = make_adapter(tmp_path / "emb", seed=4, targets=("embed_tokens", "q_proj"))
    r = _recipe(tmp_path / "della.yml", "della", [models[0], {"model": str(emb), "parameters": {"weight": 1}}],
                {"density": 0.5})
    refused(invoke("combine", "--config", r, "-o", out), "della ranks the rows", "--base")
    assert not out.exists()


def test_command_line_flags_cannot_change_a_recipe(adapters, tmp_path):
    r = _recipe(tmp_path / "r.yml", "dare_ties", [{"model": str(a), "parameters": {"weight": 1}} for a in adapters],
                {"density": 0.5})
    out = tmp_path / "m"
    refused(invoke("combine", "--config", r, "-o", out, "--density", "0.3"), "r.yml", "--density")
    refused(invoke("combine", "--config", r, "-o", out, "--method", "ties", "--weights", "1,1,1"), "--method, --weights")
    a = invoke("combine", "--config", r, "-o", tmp_path / "s1", "--seed", "1", "--quiet")
    b = invoke("combine", "--config", r, "-o", tmp_path / "s2", "--seed", "2", "--quiet")
    assert a.exit_code == b.exit_code == 0
    da, db = load_adapter(tmp_path / "s1"), load_adapter(tmp_path / "s2")
    name = next(iter(da.modules))
    assert not torch.allclose(da.delta(name), db.delta(name))  # the seed reaches the masks
    import json

    assert json.loads((tmp_path / "s1" / "merge_report.json").read_text())["params"]["seed"] == 1


@pytest.mark.parametrize("edit,fragments", [
    (lambda c: c["parameters"].update(bogus=1), ["takes no parameter 'bogus'"]),
    (lambda c: c["models"][0]["parameters"].update(normalize=True), ["normalize applies to the whole merge",
                                                                     "top-level"]),
    (lambda c: c["models"][0]["parameters"].update(weight=float("nan")), ["give a finite number"]),
    (lambda c: c["models"][0]["parameters"].update(weight=[{"filters": "mlp", "value": 1}]), ["{filter: TEXT"]),
    (lambda c: c["models"][0]["parameters"].update(density="lots"), ["density 'lots' is not a number"]),
    (lambda c: c.pop("merge_method"), ["no merge_method"]),
    (lambda c: c.update(merge_method="slerp"), ["merge_method slerp", "mergekit-yaml"]),
    (lambda c: c.update(slices=[]), ["slices (layer ranges and layer stacking) is not supported", "models"]),
    (lambda c: c.update(chat_template="chatml"), ["chat_template (a chat template for the output) is not supported"]),
    (lambda c: c.update(merge_method="pcb", parameters={"density": [0.1, 0.5]}), ["gradients and filters"]),
    (lambda c: c["models"][0].update(model="elsewhere+" + c["models"][0]["model"]), ["not the base model"]),
    (lambda c: c["models"].append(dict(c["models"][0])), ["models[3] lists", "a second time"]),
])
def test_recipe_refusals(adapters, tmp_path, edit, fragments):
    cfg = {"merge_method": "ties", "models": [{"model": str(a), "parameters": {"weight": 1.0}} for a in adapters],
           "parameters": {"density": 0.5}}
    edit(cfg)
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(cfg))
    refused(invoke("combine", "--config", path, "-o", tmp_path / "m"), "recipe.yml", *fragments)


def test_a_method_only_peftmerge_has_keeps_its_definition(adapters, tmp_path):
    r = _recipe(tmp_path / "r.yml", "magnitude_prune", [{"model": str(a)} for a in adapters[:2]], {"density": 0.3})
    report = combine(config=r, out=tmp_path / "yaml", progress=False)
    combine(adapters[:2], tmp_path / "direct", "magnitude_prune", density=0.3, progress=False)
    a, b = load_adapter(tmp_path / "yaml"), load_adapter(tmp_path / "direct")
    assert report["weights"] == [1.0, 1.0]
    for name in a.modules:
        torch.testing.assert_close(a.delta(name), b.delta(name))


# --- full models -----------------------------------------------------------------------------------------

def test_base_model_and_base_flag_must_agree(tmp_path):
    base, other = tmp_path / "base", tmp_path / "other"
    tiny_llama(0).save_pretrained(str(base))
    tiny_llama(1).save_pretrained(str(other))
    r = _recipe(tmp_path / "r.yml", "ties", [{"model": str(other), "parameters": {"weight": 1}}], base_model=str(base))
    refused(invoke("combine", "--config", r, "--base", other, "-o", tmp_path / "m"), "r.yml", "--base")


def _tokenizer(folder, order=None, template=None):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokens = ["<unk>"] + [f"t{i}" for i in range(1, 128)]
    if order == "swapped":
        tokens[5], tokens[6] = tokens[6], tokens[5]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [])),
                                  unk_token="<unk>")
    if order == "grown":
        tok.add_tokens(["<extra>"])
    tok.chat_template = template
    tok.save_pretrained(str(folder))


def test_tokenizer_source(tmp_path):
    """A model's tokenizer and chat template replace the base's; a vocabulary that would need re-mapping is
    refused."""
    from transformers import AutoTokenizer

    base, chat, swapped = tmp_path / "base", tmp_path / "chat", tmp_path / "swapped"
    for i, (folder, kw) in enumerate([(base, {}), (chat, {"template": "{{ messages }}"}), (swapped, {"order": "swapped"})]):
        tiny_llama(i).save_pretrained(str(folder))
        _tokenizer(folder, **kw)
    models = [{"model": str(chat), "parameters": {"weight": 1}}]
    r = _recipe(tmp_path / "r.yml", "ties", models, base_model=str(base), tokenizer_source=str(chat))
    combine(config=r, out=tmp_path / "m", progress=False)
    assert AutoTokenizer.from_pretrained(str(tmp_path / "m")).chat_template == "{{ messages }}"
    r = _recipe(tmp_path / "s.yml", "ties", models + [{"model": str(swapped), "parameters": {"weight": 1}}],
                base_model=str(base), tokenizer_source="base")
    refused(invoke("combine", "--config", r, "-o", tmp_path / "x"), "tokenizer_source base", "'t5'", "re-map")
    grown = tmp_path / "grown"
    tiny_llama(3).save_pretrained(str(grown))
    _tokenizer(grown, order="grown")
    r = _recipe(tmp_path / "u.yml", "ties", [{"model": str(grown), "parameters": {"weight": 1}}],
                base_model=str(base), tokenizer_source=str(grown))
    refused(invoke("combine", "--config", r, "-o", tmp_path / "x"), "129 tokens", "128 rows")
    assert not (tmp_path / "x").exists()


def test_missing_weight_fails_before_writing(tmp_path):
    base = tmp_path / "base"
    tiny_llama(0).save_pretrained(str(base))
    ft = tmp_path / "ft"
    tiny_llama(1).save_pretrained(str(ft))
    r = _recipe(tmp_path / "r.yml", "ties", [{"model": str(ft), "parameters": {"weight": [{"filter": "mlp",
                                                                                           "value": 1}]}}],
                base_model=str(base))
    refused(invoke("combine", "--config", r, "-o", tmp_path / "m"), "has no weight for tensor", "mergekit requires")
    assert not (tmp_path / "m").exists()
    with pytest.raises(PeftmergeError, match="has no weight"):
        combine(config=r, out=tmp_path / "m", progress=False)


def test_module_weights_cannot_change_a_recipe(adapters, tmp_path):
    r = _recipe(tmp_path / "r.yml", "ties", [{"model": str(a), "parameters": {"weight": 1}} for a in adapters[:2]])
    with pytest.raises(PeftmergeError, match="r.yml defines the weights of ties"):
        combine(config=r, out=tmp_path / "m", module_weights={"model.layers.0.self_attn.q_proj": [1, 0]},
                progress=False)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_ties_in_magnitude_are_broken_as_mergekit_breaks_them(method):
    """bfloat16 fine-tunes give many task-vector entries of equal magnitude: the same ones must be kept."""
    g = torch.Generator().manual_seed(2)
    base = torch.zeros(40, 30)
    inputs = [torch.randint(-3, 4, (40, 30), generator=g).float() / 8 for _ in range(2)]  # 7 distinct values
    p = {"density": [0.3, 0.45], "normalize": False, "rescale": False, "lambda": 1.0, "gamma": [0.05, 0.1]}
    ours = mk.merge_delta(mk.METHODS[method], torch.stack(inputs), [1.0, 0.5], p)
    extra = {"gamma": p["gamma"]} if method == "breadcrumbs" else {}
    theirs = _theirs(method, inputs, base, weight=[1.0, 0.5], density=p["density"], normalize=False, **extra)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_base_model_and_base_flag_may_name_one_folder_two_ways(tmp_path, monkeypatch):
    base, ft = tmp_path / "base", tmp_path / "ft"
    tiny_llama(0).save_pretrained(str(base))
    tiny_llama(1).save_pretrained(str(ft))
    monkeypatch.chdir(tmp_path)
    r = _recipe(tmp_path / "r.yml", "task_arithmetic", [{"model": "ft", "parameters": {"weight": 0.5}}],
                base_model="base")
    assert invoke("combine", "--config", r, "--base", base, "-o", tmp_path / "m", "--quiet").exit_code == 0
