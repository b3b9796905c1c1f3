"""A mergekit recipe means what mergekit (0.1.5) means: its own example and test configs, run through mergekit
(``run_merge``, in process) and through ``peftmerge combine --config RECIPE --base BASE`` (click, in process).

Every config either agrees (float32, to 1e-5 of each tensor's largest entry; random methods: the same expected
value, from the mean over seeds) or is refused by peftmerge with one line and exit code 2. Configs are
transcribed from mergekit's repository (``examples/*.yml``) and its sdist's ``tests/`` (the configs the tests
build), adapted only in model names (mapped to tiny local Llamas: ``base_model`` to BASE, the others in order of
appearance to fine-tunes of it) and in ``dtype`` (float32, so that both sides compute in the same precision;
mergekit computes in ``dtype``, peftmerge always in float32). Cases named ``peftmerge:`` are additions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mergekit  # noqa: F401  (a test dependency: the parity tests fail loudly without it)
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import make_adapter, tiny_llama
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
from safetensors.torch import load_file

from peftmerge.cli.main import main
from peftmerge.errors import PeftmergeError
from peftmerge.merge import mergekit_methods as mk
from peftmerge.merge.mergekit_recipe import differences_table
from peftmerge.merge.mergekit_methods import REFUSED_KEYS
from peftmerge.merge.recipe import load_recipe

LAYERS = 4  # so that gradients interpolate between list entries
RANDOM_SEEDS = 8

TWO = "models:\n  - model: model_a\n    parameters: {{weight: 0.6}}\n  - model: model_b\n    parameters: {{weight: 0.4}}\n" \
      "merge_method: {method}\n{base}dtype: bfloat16\n{params}"


def two(method, base="", params=None):
    """mergekit's tests/test_basic_merges.py ``two_model_config``."""
    return TWO.format(method=method, base=f"base_model: {base}\n" if base else "",
                      params=f"parameters: {json.dumps(params)}\n" if params else "")


def tokenizer_config(models, base="model_base", method="linear", source=None, extra=""):
    """mergekit's tests/test_tokenizer.py ``make_config``: every model at weight 1."""
    lines = [f"merge_method: {method}", f"base_model: {base}", "dtype: float32", "models:"]
    lines += [f"  - model: {m}\n    parameters: {{weight: 1.0}}" for m in models]
    if source:
        lines.append(f"tokenizer_source: {source}")
    return "\n".join(lines) + "\n" + extra


def resolution(method, explicit_base):
    """mergekit's tests/test_config_parameters.py ``test_raw_and_yaml_parameter_resolution_agree``."""
    models = [{"model": "a", "parameters": {"weight": {"filter": "other", "value": 99}}},
              {"model": "b", "parameters": {"weight": 0.0}}]
    if explicit_base:
        models.append({"model": "base", "parameters": {"weight": "not-a-number" if method != "linear" else "1e-4"}})
    return yaml.safe_dump({"merge_method": method, "base_model": "base", "models": models,
                           "parameters": {"weight": ["1e-5", "1e-3"], "normalize": False}})


CASES = {
    # mergekit examples/ (verbatim)
    "examples/arcee_fusion.yml": """
models:
  - model: model_a
  - model: model_b
merge_method: arcee_fusion
base_model: model_a
dtype: bfloat16
""",
    "examples/bio-merge.yml": """
models:
  - model: mistralai/Mistral-7B-Instruct-v0.2
    parameters:
      density: 0.5
      weight: 0.5
  - model: BioMistral/BioMistral-7B
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  normalize: false
  int8_mask: true
dtype: float16
""",
    "examples/gradient-slerp.yml": """
slices:
  - sources:
      - model: psmathur/orca_mini_v3_13b
        layer_range: [0, 40]
      - model: garage-bAInd/Platypus2-13B
        layer_range: [0, 40]
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
""",
    "examples/linear.yml": """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      weight: 1.0
  - model: WizardLM/WizardLM-13B-V1.2
    parameters:
      weight: 0.3
  - model: garage-bAInd/Platypus2-13B
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
""",
    "examples/orcamini-platy-44layer.yml": """
slices:
  - sources:
    - model: psmathur/orca_mini_v3_13b
      layer_range: [0, 24]
  - sources:
    - model: garage-bAInd/Platypus2-13B
      layer_range: [20, 40]
merge_method: passthrough
dtype: float16
""",
    "examples/ties.yml": """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""",
    # mergekit tests/test_basic_merges.py
    "test_basic_merges::linear": two("linear"),
    "test_basic_merges::slerp": two("slerp", "model_a", {"t": 0.35}),
    "test_basic_merges::nuslerp": two("nuslerp", "model_c", {"nuslerp_row_wise": False, "nuslerp_flatten": False}),
    "test_basic_merges::task_arithmetic": two("task_arithmetic", "model_c"),
    "test_basic_merges::breadcrumbs": two("breadcrumbs", "model_c"),
    "test_basic_merges::ties": two("ties", "model_c", {"density": 0.3}),
    "test_basic_merges::sce": two("sce", "model_c", {"select_topk": 0.5}),
    "test_basic_merges::ram": two("ram", "model_c"),
    "test_basic_merges::ramplus_tl": two("ramplus_tl", "model_c", {"r": 0.05, "alpha": 1.0}),
    "test_basic_merges::multislerp": two("multislerp", "model_c"),
    "test_basic_merges::dare_ties": two("dare_ties", "model_c", {"density": 0.66}),
    "test_basic_merges::model_stock": two("model_stock", "model_a"),
    "test_basic_merges::model_stock_filterwise": two("model_stock", "model_a", {"filter_wise": True}),
    "test_basic_merges::arcee_fusion": two("arcee_fusion", "model_a"),
    "test_basic_merges::nearswap": two("nearswap", "model_a", {"t": 0.0001}),
    "test_basic_merges::della": two("della", "model_c", {"density": 0.66, "epsilon": 0.05, "lambda": 0.5}),
    "test_basic_merges::della_invalid_epsilon": two("della", "model_c", {"density": 0.66, "epsilon": 1.35,
                                                                         "lambda": 0.5}),
    "test_basic_merges::karcher": two("karcher", "model_c", {"max_iter": 5, "tol": 1e-5}),
    "test_basic_merges::passthrough_scale": "merge_method: passthrough\nmodels:\n  - model: model_a\n    parameters:\n"
                                            "      scale:\n        - {filter: o_proj, value: 0}\n        - {value: 1}\n",
    "test_basic_merges::gpt2_stack": "merge_method: passthrough\ndtype: bfloat16\nslices:\n"
                                     + "  - sources:\n      - {model: gpt2_like, layer_range: [0, 12]}\n" * 2,
    # mergekit tests/test_config_parameters.py
    "test_config_parameters::linear": resolution("linear", False),
    "test_config_parameters::linear_explicit_base": resolution("linear", True),
    "test_config_parameters::ties": resolution("ties", False),
    "test_config_parameters::ties_explicit_base": resolution("ties", True),
    "test_config_parameters::nuslerp": resolution("nuslerp", False),
    "test_config_parameters::filter_fallback": "merge_method: linear\nmodels:\n  - model: a\nparameters:\n"
                                               "  weight: {filter: embed, value: ['1e-5', '1e-3']}\n",
    "test_config_parameters::missing_weight": "merge_method: linear\nmodels:\n  - model: a\n    parameters: "
                                              "{weight: 1}\n  - model: b\n",
    "test_config_parameters::modules": "merge_method: linear\nmodules:\n  model:\n    slices:\n      - sources:\n"
                                       "          - {model: a, layer_range: [0, 3]}\n"
                                       "parameters:\n  weight: [{filter: w, value: [1e-5, 1e-3]}]\n",
    # mergekit tests/test_tokenizer.py and test_chat_template.py
    "test_tokenizer::mismatched_vocabulary": tokenizer_config(["model_base", "model_padded", "model_chatml"]),
    "test_tokenizer::source_base": tokenizer_config(["model_base", "model_padded", "model_chatml"], source="base"),
    "test_tokenizer::source_union": tokenizer_config(["model_base", "model_padded", "model_chatml"], source="union"),
    "test_tokenizer::source_model": tokenizer_config(["model_base", "model_padded", "model_chatml"],
                                                     source="model_chatml"),
    "test_tokenizer::slerp_union": tokenizer_config(["model_base", "model_chatml"], method="slerp", source="union",
                                                    extra="parameters: {t: 0.5}\n"),
    "test_tokenizer::task_arithmetic_aligns": tokenizer_config(["model_base", "model_chatml"],
                                                               method="task_arithmetic",
                                                               extra="tokenizer: {source: base}\n"),
    "test_chat_template::chatml": "merge_method: linear\nbase_model: model_base\ndtype: bfloat16\nchat_template: chatml\n"
                                  "models:\n  - {model: model_base, parameters: {weight: 0.5}}\n"
                                  "  - {model: model_b, parameters: {weight: 0.5}}\n",
    # peftmerge's additions: what the configs above leave out
    "peftmerge:tokenizer_source_base": tokenizer_config(["model_base", "model_padded"], source="base"),
    "peftmerge:tokenizer_source_union": tokenizer_config(["model_base", "model_padded"], source="union"),
    "peftmerge:tokenizer_source_model": tokenizer_config(["model_base", "model_padded"], source="model_chat"),
    "peftmerge:ties_unequal_weights": "merge_method: ties\nbase_model: base\nmodels:\n"
                                      "  - {model: a, parameters: {weight: 1.0, density: 0.5}}\n"
                                      "  - {model: b, parameters: {weight: 0.3, density: 0.5}}\n"
                                      "  - {model: c, parameters: {weight: 2.0, density: 0.5}}\n",
    "peftmerge:dare_ties_density_1": "merge_method: dare_ties\nbase_model: base\nparameters: {lambda: 0.8}\nmodels:\n"
                                     "  - {model: a, parameters: {weight: 0.7}}\n  - {model: b, parameters: {weight: 0.5}}\n",
    "peftmerge:dare_linear_no_rescale": "merge_method: dare_linear\nbase_model: base\nparameters: {rescale: false}\n"
                                        "models:\n  - {model: a, parameters: {weight: 0.7, density: 0.4}}\n"
                                        "  - {model: b, parameters: {weight: 0.5, density: 0.6}}\n",
    "peftmerge:breadcrumbs_ties_filters": "merge_method: breadcrumbs_ties\nbase_model: base\nparameters:\n"
                                          "  density: [{filter: self_attn, value: [0.2, 0.8]}, {value: 0.5}]\n"
                                          "  gamma: 0.05\n  normalize: true\nmodels:\n"
                                          "  - {model: a, parameters: {weight: 0.6}}\n"
                                          "  - {model: b, parameters: {weight: 0.4, gamma: 0.1}}\n",
    "peftmerge:della_linear_density_1": "merge_method: della_linear\nbase_model: base\nparameters: {normalize: true}\n"
                                        "models:\n  - {model: a, parameters: {weight: 0.6, epsilon: 0.2}}\n"
                                        "  - {model: b, parameters: {weight: 0.3}}\n",
    "peftmerge:lora_input": "merge_method: ties\nbase_model: base\nmodels:\n"
                            "  - {model: base+lora, parameters: {weight: 0.7, density: 0.5}}\n"
                            "  - {model: a, parameters: {weight: 0.5, density: 0.5}}\n",
    "peftmerge:no_merge_method": "base_model: base\nmodels:\n  - {model: a, parameters: {weight: 1.0}}\n",
}
# random masks: the same mean over seeds here; the same merge for the same draw in tests/test_mergekit_recipe.py
RANDOM = {"test_basic_merges::dare_ties", "test_basic_merges::della", "peftmerge:dare_linear_no_rescale"}
# the configs peftmerge merges (agreeing with mergekit); every other one it refuses
AGREE = {"examples/bio-merge.yml", "examples/linear.yml", "examples/ties.yml", "test_basic_merges::linear",
         "test_basic_merges::task_arithmetic", "test_basic_merges::breadcrumbs", "test_basic_merges::ties",
         "test_basic_merges::dare_ties", "test_basic_merges::della", "test_config_parameters::linear",
         "test_config_parameters::linear_explicit_base", "test_config_parameters::ties",
         "test_config_parameters::ties_explicit_base"} | {c for c in CASES if c.startswith("peftmerge:")} - {
             "peftmerge:no_merge_method"}
TOKENIZER_NAMES = {"model_base": "base", "model_padded": "padded", "model_chatml": "chatml", "model_chat": "chat",
                   "lora": "lora"}


def _tokenizer(path, extra=(), template=None):
    """A BPE tokenizer of exactly 128 tokens (the tiny Llama's vocabulary), plus ``extra`` added tokens."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, 128)])}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab, [], unk_token="<unk>")),
                                  unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.add_tokens(list(extra))
    if template:
        tok.chat_template = template
    tok.save_pretrained(str(path))


def _fine_tune(path, seed, **kw):
    model = tiny_llama(0, num_hidden_layers=LAYERS, **kw)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    model.save_pretrained(str(path))
    _tokenizer(path)
    return path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """BASE, three fine-tunes of it, tokenizer variants (unused extra tokens, a chat template, 130 rows)
    and a LoRA adapter of BASE."""
    root = tmp_path_factory.mktemp("zoo")
    tiny_llama(0, num_hidden_layers=LAYERS).save_pretrained(str(root / "base"))
    _tokenizer(root / "base")
    out = {"base": root / "base"}
    for i in range(3):
        out[f"ft{i}"] = _fine_tune(root / f"ft{i}", 10 + i)
    out["padded"] = _fine_tune(root / "padded", 20)
    _tokenizer(out["padded"], extra=[f"<UNUSED_{i}>" for i in range(4)])  # ids 128..131: past the embeddings
    out["chat"] = _fine_tune(root / "chat", 21)
    _tokenizer(out["chat"], template="{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}")
    out["chatml"] = _fine_tune(root / "chatml", 22, vocab_size=130)
    _tokenizer(out["chatml"], extra=["<|im_start|>", "<|im_end|>"])
    out["lora"] = make_adapter(root / "lora", seed=5, targets=("q_proj", "v_proj", "up_proj"),
                               model_kw={"num_hidden_layers": LAYERS})
    return out


def _localize(text: str, zoo: dict) -> dict:
    """The config with model names mapped to the zoo (base_model -> BASE, other names in order -> fine-tunes)
    and dtypes set to float32."""
    cfg = yaml.safe_load(text)
    names: dict[str, Path] = {}
    base = cfg.get("base_model")
    if base in TOKENIZER_NAMES:
        names[base] = zoo[TOKENIZER_NAMES[base]]
    elif base:
        names[base] = zoo["base"]

    def local(ref: str) -> str:
        if "+" in ref:
            return "+".join(local(part) for part in ref.split("+"))
        if ref not in names:
            key = TOKENIZER_NAMES.get(ref) or f"ft{sum(1 for k in names if k not in TOKENIZER_NAMES and k != base)}"
            names[ref] = zoo[key]
        return str(names[ref])

    if base:
        cfg["base_model"] = local(base)
    for m in cfg.get("models") or []:
        m["model"] = local(m["model"])
    for s in cfg.get("slices") or []:
        for src in s["sources"]:
            src["model"] = local(src["model"])
    for module in (cfg.get("modules") or {}).values():
        for s in module.get("slices") or []:
            for src in s["sources"]:
                src["model"] = local(src["model"])
    if cfg.get("tokenizer_source") not in (None, "base", "union"):
        cfg["tokenizer_source"] = local(cfg["tokenizer_source"])
    for key in ("dtype", "out_dtype"):
        if key in cfg:
            cfg[key] = "float32"
    return cfg


def _tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _run_mergekit(cfg: dict, out: Path, seed: int | None = None):
    """mergekit's merged tensors, or the exception it raised."""
    try:
        run_merge(MergeConfiguration.model_validate(cfg), str(out),
                  options=MergeOptions(quiet=True, random_seed=seed, lora_merge_cache=str(out) + "-lora"))
    except Exception as e:  # noqa: BLE001 - any refusal of mergekit's counts as one
        return e
    return _tensors(out)


def _run_peftmerge(cfg: dict, folder: Path, zoo: dict, seed: int | None = None):
    recipe = folder / "recipe.yml"
    recipe.write_text(yaml.safe_dump(cfg))
    base = cfg.get("base_model") or (cfg.get("models") or [{}])[0].get("model") or zoo["base"]
    out = folder / f"peftmerge-{seed}"
    args = ["combine", "--config", recipe, "--base", base, "-o", out, "--quiet"]
    result = CliRunner().invoke(main, [str(a) for a in args + (["--seed", seed] if seed is not None else [])])
    return result, out


def _assert_refused(result):
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output


def _assert_same_mean(ours: list[dict], theirs: list[dict]):
    """Random merges: the squared difference of the two means over seeds, summed over all entries, against
    its expectation when the expected values agree (the summed variances of the two means): a ratio near 1
    (and one that grows with the runs when they do not agree)."""
    diff2, expected, total = 0.0, 0.0, 0
    for name in theirs[0]:
        a = torch.stack([r[name] for r in ours]).double()
        b = torch.stack([r[name] for r in theirs]).double()
        var = (a.var(0) + b.var(0)) / len(ours)
        fixed = var == 0  # entries no draw changes (a zero task vector, or a copied tensor): must agree exactly
        torch.testing.assert_close(a.mean(0)[fixed], b.mean(0)[fixed], atol=1e-6, rtol=1e-5, msg=name)
        diff2 += float((a.mean(0) - b.mean(0))[~fixed].square().sum())
        expected += float(var[~fixed].sum())
        total += int((~fixed).sum())
    assert total > 1000 and diff2 / expected < 1.3, (diff2 / expected, total)


@pytest.mark.parametrize("case", sorted(CASES))
def test_mergekit_config(case, zoo, tmp_path):
    cfg = _localize(CASES[case], zoo)
    seeds = range(RANDOM_SEEDS) if case in RANDOM else [None]
    theirs, ours = [], []
    for seed in seeds:
        result, out = _run_peftmerge(cfg, tmp_path, zoo, seed)
        if case not in AGREE:
            _assert_refused(result)
            return
        assert result.exit_code == 0, result.output
        ours.append(_tensors(out))
        mine = _run_mergekit(cfg, tmp_path / f"mergekit-{seed}", seed)
        assert not isinstance(mine, Exception), f"mergekit refuses what peftmerge merged: {mine!r}"
        theirs.append(mine)
    assert set(ours[0]) == set(theirs[0])
    if case in RANDOM:
        _assert_same_mean(ours, theirs)
    else:
        for name, t in theirs[0].items():
            assert ours[0][name].dtype == t.dtype, name
            scale = float(t.abs().max().clamp(min=1e-30))
            torch.testing.assert_close(ours[0][name], t, atol=1e-5 * scale, rtol=0, msg=name)
    if cfg.get("tokenizer_source"):  # the same tokenizer, chat template included
        from transformers import AutoTokenizer

        a = AutoTokenizer.from_pretrained(str(out))
        b = AutoTokenizer.from_pretrained(str(tmp_path / f"mergekit-{seeds[0]}"))
        assert a.get_vocab() == b.get_vocab() and a.chat_template == b.chat_template


def test_refusals_name_the_key_or_the_method(zoo):
    """A config refused as it is read names what mergekit does with it (a key or a method of the README's
    table), or is one mergekit refuses too (a model without a weight, no merge_method)."""
    for case, text in CASES.items():
        try:
            load_recipe(_write(zoo, case, _localize(text, zoo)))
        except PeftmergeError as e:
            message = str(e)
            assert case not in AGREE, message
            assert any(f": {key} (" in message and "is not supported" in message for key in REFUSED_KEYS) or \
                any(f"merge_method {m} " in message for m in mk.REFUSED_METHODS) or \
                "no merge_method" in message, (case, message)


def _write(zoo, case, cfg) -> Path:
    path = Path(zoo["base"]).parent / (re.sub(r"\W+", "_", case) + ".yml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_refused_methods_are_exactly_mergekits_others():
    from mergekit.merge_methods import registry

    theirs = {m.spec.name for m in registry.registered_methods()}
    assert set(mk.METHODS) | set(mk.REFUSED_METHODS) == theirs
    assert not set(mk.METHODS) & set(mk.REFUSED_METHODS)


def test_readme_lists_the_differences():
    """docs/merging.md's "Differences from mergekit" table is :func:`differences_table` (refused methods and keys
    and every convention that differs); regenerate it with
    ``python -c "from peftmerge.merge.mergekit_recipe import differences_table; print(differences_table())"``."""
    readme = (Path(__file__).parents[2] / "docs" / "merging.md").read_text()
    table = differences_table()
    assert table in readme
    for name in mk.REFUSED_METHODS:
        assert f"| `merge_method: {name}` |" in table
    for key in REFUSED_KEYS:
        assert f"| `{key}` |" in table
