"""Every PEFT LoRA variant is merged as its true task vector or refused with one line: --alpha, moved-base
inits (PiSSA ...), biases, Iso-C at a lower rank, breadcrumbs rows on Conv1D/Embedding, finiteness, tied
embeddings, the output config's r and exact zeros, --seed for every method."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from conftest import gpt2_adapter, make_adapter, tiny_gpt2, tiny_llama
from peftmerge.cli.main import main
from peftmerge.errors import PeftmergeError
from peftmerge.io.adapter import load_adapter
from peftmerge.merge import execute, registry
from peftmerge.merge.combine import combine
from peftmerge.merge.plan import plan_modules
from peftmerge.search.inmemory import Patcher

IDS = torch.tensor([[1, 5, 9, 3, 7, 2], [4, 4, 8, 1, 0, 6]])
BIASED = {"attention_bias": True, "mlp_bias": True}


def peft_logits(folder, **model_kw):
    with torch.no_grad():
        return PeftModel.from_pretrained(tiny_llama(0, **model_kw), str(folder)).eval()(IDS).logits


def full_logits(folder):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()(IDS).logits


def edit_config(folder, **changes):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def with_biases(folder, seed, bias, **kw):
    """A LoRA adapter that also trained biases (``bias``) on the biased tiny Llama, biases moved by seed."""
    make_adapter(folder, seed=seed, bias=bias, model_kw=BIASED, **kw)
    state = load_file(str(folder / "adapter_model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    state = {k: v + 0.1 * torch.randn(v.shape, generator=g) if k.endswith("bias") else v for k, v in state.items()}
    save_file(state, str(folder / "adapter_model.safetensors"))
    return folder


# --- 1. --alpha is for inputs without a config ------------------------------------------------------------------

def test_alpha_applies_only_to_the_bare_input(tmp_path):
    a = make_adapter(tmp_path / "a", seed=1, r=4, alpha=16, alpha_pattern={"v_proj": 2})
    b = make_adapter(tmp_path / "b", seed=2, r=4, alpha=4)
    bare = tmp_path / "bare" / "b.safetensors"
    bare.parent.mkdir()
    save_file(load_file(str(b / "adapter_model.safetensors")), str(bare))
    combine([a, bare], tmp_path / "m", "task_arithmetic", alpha=4, progress=False)
    la, lb, out = load_adapter(a), load_adapter(b), load_adapter(tmp_path / "m")
    for k in out.modules:  # a keeps its own lora_alpha 16 and alpha_pattern, b gets --alpha 4
        torch.testing.assert_close(out.delta(k), la.delta(k) + lb.delta(k), atol=1e-5, rtol=1e-4)
    with pytest.raises(PeftmergeError, match="--alpha 4 is for inputs without an adapter_config.json"):
        combine([a, b], tmp_path / "n", "task_arithmetic", alpha=4, progress=False)


# --- 2. inits that moved W0, and variants that are not s*B@A ------------------------------------------------------

def test_pissa_is_refused_unless_converted_and_converted_gives_the_true_task_vector(tmp_path):
    model = tiny_llama(0)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights="pissa"))
    pm.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the initial adapter saved as plain LoRA
    pm.save_pretrained(str(tmp_path / "init"))
    pm.peft_config["default"].init_lora_weights = "pissa"
    torch.manual_seed(3)
    with torch.no_grad():  # "training"
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.05)
    pm.save_pretrained(str(tmp_path / "raw"))
    pm.save_pretrained(str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    with pytest.raises(PeftmergeError, match="init_lora_weights='pissa' moved the base weights.*"
                                             "path_initial_model_for_weight_conversion"):
        combine([tmp_path / "raw"], tmp_path / "m", "task_arithmetic", progress=False)
    trained = pm.merge_and_unload()  # W_res + s B A: the fine-tuned model
    w0, ours = tiny_llama(0), load_adapter(tmp_path / "converted")
    assert json.loads((tmp_path / "converted" / "adapter_config.json").read_text())["r"] == 8  # 2r, as PEFT writes
    for k in ours.modules:
        true = trained.get_submodule(k).weight - w0.get_submodule(k).weight
        torch.testing.assert_close(ours.delta(k), true, atol=2e-5, rtol=1e-4)
    combine([tmp_path / "converted"], tmp_path / "m", "task_arithmetic", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(peft_logits(tmp_path / "m"), trained(IDS).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("field,value,fragment", [
    ("init_lora_weights", "olora", "moved the base weights"),
    ("init_lora_weights", "corda", "moved the base weights"),
    ("init_lora_weights", "pissa_niter_4", "path_initial_model_for_weight_conversion"),
    ("init_lora_weights", "lora_ga", "moved the base weights"),
    ("init_lora_weights", "loftq", "LoftQ's quantized copy"),
    ("init_lora_weights", "something_new", "not an initialisation peftmerge knows"),
    ("use_qalora", True, "QALoRA"),
    ("alora_invocation_tokens", [5, 6], "aLoRA"),
    ("layer_replication", [[0, 2], [1, 2]], "layer_replication"),
    ("target_parameters", ["mlp.experts.down_proj"], "target_parameters"),
    ("kasa_config", {"r": 4}, "KaSA"),
    ("use_bdlora", {"nblocks": 2}, "BD-LoRA"),
    ("monteclora_config", {"n": 2}, "MonteCLoRA"),
    ("arrow_config", {"top_k": 2}, "Arrow"),
    ("trainable_token_indices", [3, 5], "trainable tokens"),
    ("lora_alpha", float("nan"), "lora_alpha nan is not a finite number"),
])
def test_variants_that_are_not_s_b_a_are_refused_in_one_line(tmp_path, field, value, fragment):
    a = edit_config(make_adapter(tmp_path / "a", seed=1), **{field: value})
    r = CliRunner().invoke(main, ["combine", str(a), "-o", str(tmp_path / "m"), "--method", "task_arithmetic"])
    assert r.exit_code == 2 and fragment in r.output and str(a) in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "m").exists()


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "mica"])
def test_inits_that_leave_w0_alone_are_read_as_s_b_a(tmp_path, init):
    a = edit_config(make_adapter(tmp_path / "a", seed=1), init_lora_weights=init)
    combine([a], tmp_path / "m", "task_arithmetic", progress=False)
    torch.testing.assert_close(peft_logits(tmp_path / "m"), peft_logits(a), atol=1e-5, rtol=1e-4)


# --- 3. biases and trainable tokens -----------------------------------------------------------------------------

@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_trained_biases_merge_when_exact_and_the_config_says_so(tmp_path, bias):
    a = with_biases(tmp_path / "a", 1, bias)
    b = with_biases(tmp_path / "b", 2, bias, r=2, alpha=6)
    combine([a], tmp_path / "one", "task_arithmetic", progress=False)
    torch.testing.assert_close(peft_logits(tmp_path / "one", **BIASED), peft_logits(a, **BIASED), atol=1e-5, rtol=1e-4)
    cfg = json.loads((tmp_path / "one" / "adapter_config.json").read_text())
    assert cfg["bias"] == bias  # consistent with the bias tensors written
    # weights summing to 1: b0 + sum_i w_i (b_i - b0) = sum_i w_i b_i, checked against the model built by hand
    combine([a, b], tmp_path / "two", "task_arithmetic", weights=[0.25, 0.75], progress=False)
    la, lb = load_adapter(a, merges_biases=True), load_adapter(b, merges_biases=True)
    ref = tiny_llama(0, **BIASED)
    with torch.no_grad():
        for k in set(la.modules) | set(lb.modules):
            ref.get_submodule(k).weight += sum(w * x.delta(k) for w, x in ((0.25, la), (0.75, lb)) if k in x.modules)
        for name in la.biases:
            ref.get_parameter(name).copy_(0.25 * la.bias(name) + 0.75 * lb.bias(name))
        torch.testing.assert_close(peft_logits(tmp_path / "two", **BIASED), ref(IDS).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(PeftmergeError, match="trained biases .* pass --base BASE .*ties is not a weighted sum"):
        combine([a, b], tmp_path / "t", "ties", progress=False)
    with pytest.raises(PeftmergeError, match="sum to 1, not 2"):
        combine([a, b], tmp_path / "t", "task_arithmetic", progress=False)
    # an input that trained no bias leaves it at b0 (a zero task vector): a's at weight 1 is a's bias, exactly
    plain = make_adapter(tmp_path / "plain", seed=3, model_kw=BIASED)
    combine([a, plain], tmp_path / "mixed", "task_arithmetic", weights=[1.0, 0.5], progress=False)
    mixed = load_adapter(tmp_path / "mixed", merges_biases=True)
    assert set(mixed.biases) == set(la.biases)
    assert all(torch.equal(mixed.bias(k), la.bias(k)) for k in la.biases)


def test_a_heads_biases_stay_with_the_head(tmp_path):
    """bias="all" on a classifier: the biases under modules_to_save (RoBERTa's classifier.dense.bias) are the
    head's, not trained biases of the base model."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    config = RobertaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                           vocab_size=96, max_position_embeddings=70, num_labels=2)
    pm = get_peft_model(RobertaForSequenceClassification(config).eval(),
                        LoraConfig(r=2, target_modules=["query"], bias="all", task_type="SEQ_CLS"))
    pm.save_pretrained(str(tmp_path / "a"))
    a = load_adapter(tmp_path / "a", merges_biases=True)
    assert "base_model.model.classifier.dense.bias" in a.head_keys
    assert a.biases and not any("classifier" in k for k in a.biases)
    assert "roberta.encoder.layer.0.attention.self.query.bias" in a.biases  # a LoRA module's own (base_layer) bias


def test_trained_biases_with_base_are_task_vectors(tmp_path):
    base = tmp_path / "base"
    tiny_llama(0, **BIASED).save_pretrained(str(base))
    a, b = with_biases(tmp_path / "a", 1, "all"), with_biases(tmp_path / "b", 2, "lora_only")
    combine([a, b], tmp_path / "m", "ties", base=base, density=0.5, progress=False)
    got, b0 = load_file(str(tmp_path / "m" / "model.safetensors")), load_file(str(base / "model.safetensors"))
    la, lb = load_adapter(a, merges_biases=True), load_adapter(b, merges_biases=True)
    m = registry.get("ties")
    for name in la.biases:  # b's lora_only biases cover q/v only: its other biases are unchanged (zero task vector)
        deltas = torch.stack([x.bias(name) - b0[name] if name in x.biases else torch.zeros_like(b0[name])
                              for x in (la, lb)])
        expected = b0[name] + execute.dense(m, deltas, torch.ones(2), m.resolve({"density": 0.5}, 2),
                                            registry.Context(name))
        torch.testing.assert_close(got[name], expected, atol=1e-6, rtol=1e-5)


def test_lora_bias_merges_as_a_task_vector_in_adapter_and_base_modes(tmp_path):
    a = make_adapter(tmp_path / "a", seed=1, lora_bias=True, model_kw=BIASED)
    b = make_adapter(tmp_path / "b", seed=2, model_kw=BIASED, targets=("q_proj", "o_proj"))
    combine([a, b], tmp_path / "m", "task_arithmetic", weights=[1.0, 0.5], progress=False)
    with torch.no_grad():  # PEFT's own forward of each input, added by hand
        pa = PeftModel.from_pretrained(tiny_llama(0, **BIASED), str(a)).merge_and_unload()
        pb = PeftModel.from_pretrained(tiny_llama(0, **BIASED), str(b)).merge_and_unload()
        ref, b0 = tiny_llama(0, **BIASED), tiny_llama(0, **BIASED)
        for (name, p), pa_, pb_, p0 in zip(ref.named_parameters(), pa.parameters(), pb.parameters(),
                                          b0.parameters()):
            p += (pa_ - p0) + 0.5 * (pb_ - p0)
        expected = ref(IDS).logits
    assert json.loads((tmp_path / "m" / "adapter_config.json").read_text())["lora_bias"] is True
    torch.testing.assert_close(peft_logits(tmp_path / "m", **BIASED), expected, atol=1e-4, rtol=1e-4)
    base = tmp_path / "base"
    tiny_llama(0, **BIASED).save_pretrained(str(base))
    combine([a, b], tmp_path / "full", "task_arithmetic", weights=[1.0, 0.5], base=base, progress=False)
    torch.testing.assert_close(full_logits(tmp_path / "full"), expected, atol=1e-4, rtol=1e-4)
    # search, grams and routing apply the LoRA factors only: they refuse what they would get wrong
    with pytest.raises(PeftmergeError, match="changes biases too .*lora_B.bias.*only `peftmerge combine` merges"):
        load_adapter(a)


# --- 4. Iso-C at a lower rank keeps the sum's top directions --------------------------------------------------------

def test_iso_c_rank_keeps_the_top_directions_of_the_sum(adapters, tmp_path):
    k = 3
    combine(adapters, tmp_path / "m", "iso_c", rank=k, progress=False)
    ins, out = [load_adapter(a) for a in adapters], load_adapter(tmp_path / "m")
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    for row in report["per_module"]:
        name = row["module"]
        total = sum(a.delta(name).double() for a in ins if name in a.modules)
        u, s, vh = torch.linalg.svd(total)
        kk = out.modules[name].rank  # k, or the sum's rank where that is smaller
        assert kk == min(k, sum(row["rank_in"]))
        q = torch.linalg.qr(out.factors(name)[1].double()).Q  # the output's column space
        assert float((u[:, :kk].T @ q).square().sum()) / kk > 0.999  # overlap with the top-k directions
        # Iso-C of the sum's best rank-k approximation: mean(S_k) U_k V_k^T, error against the full Iso-C merge
        torch.testing.assert_close(out.delta(name).double(), s[:kk].mean() * u[:, :kk] @ vh[:kk], atol=1e-5,
                                   rtol=1e-4)
        r = int((s > 1e-6 * s[0]).sum())
        full = s[:r].mean() * u[:, :r] @ vh[:r]
        assert row["relative_error"] == pytest.approx(float((full - out.delta(name)).norm() / full.norm()), rel=1e-3,
                                                      abs=1e-6)


# --- 5. breadcrumbs rows along the weight's own rows (Conv1D, Embedding) ----------------------------------------------

@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_rows_are_the_weights_rows_for_conv1d_and_embeddings(tmp_path, method):
    a, b = gpt2_adapter(tmp_path / "a", 1), gpt2_adapter(tmp_path / "b", 2)
    base = tmp_path / "base"
    tiny_gpt2().save_pretrained(str(base))
    params = {"density": 0.3, "gamma": 0.05}
    combine([a, b], tmp_path / "lora", method, rank=32, space="full", progress=False, **params)
    combine([a, b], tmp_path / "full", method, base=base, progress=False, **params)
    out, ins = load_adapter(tmp_path / "lora"), [load_adapter(a), load_adapter(b)]
    full, w0 = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(base / "model.safetensors"))
    m = registry.get(method)
    for name in ("transformer.h.0.attn.c_attn", "transformer.wte"):
        layout = torch.stack([x.delta(name).T for x in ins])  # the weight's layout: (d_in, d_out) / (vocab, dim)
        expected = execute.dense(m, layout, torch.ones(2), m.resolve(params, 2))
        torch.testing.assert_close(out.delta(name).T, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(full[f"{name}.weight"] - w0[f"{name}.weight"], expected, atol=1e-5, rtol=1e-4)
    ids = torch.tensor([[1, 5, 9, 33, 60]])  # the adapter (fan_in_fan_out) in PEFT = the full model (lm_head untied)
    with torch.no_grad():
        lora = PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "lora")).eval()(ids).logits
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full"), dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(lora, merged, atol=1e-4, rtol=1e-4)


# --- 6. finiteness ----------------------------------------------------------------------------------------------

def test_non_finite_numbers_are_refused_before_anything_is_written(tmp_path):
    a, b = make_adapter(tmp_path / "a", seed=1), make_adapter(tmp_path / "b", seed=2)
    bare = tmp_path / "bare" / "b.safetensors"
    bare.parent.mkdir()
    save_file(load_file(str(b / "adapter_model.safetensors")), str(bare))
    out = tmp_path / "m"
    cases = [
        (["--weights", "nan,1"], "holds nan; give finite numbers"),
        (["--method", "task_arithmetic", "--lambda", "inf"], "lambda inf is not a finite number"),
        (["--method", "ties", "--density", "nan"], "density nan is not a finite number"),
    ]
    for args, fragment in cases:
        r = CliRunner().invoke(main, ["combine", str(a), str(b), "-o", str(out), *args])
        assert r.exit_code == 2 and fragment in r.output and len(r.output.strip().splitlines()) == 1, r.output
    r = CliRunner().invoke(main, ["combine", str(a), str(bare), "-o", str(out), "--alpha", "nan"])
    assert r.exit_code == 2 and "alpha nan is not a finite number" in r.output, r.output
    big = make_adapter(tmp_path / "big", seed=3, alpha=1e11)  # s*B and sqrt(singular values) past float16's 65504
    for method in ("task_arithmetic", "ties"):
        r = CliRunner().invoke(main, ["combine", str(big), str(a), "-o", str(out), "--method", method,
                                      "--weights", "2,1", "--dtype", "float16", "--rank", "32"])
        assert r.exit_code == 2 and "overflows float16" in r.output and "--dtype float32" in r.output, r.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".m.tmp")]


# --- 7. tied embeddings -------------------------------------------------------------------------------------------

TIED = {"tie_word_embeddings": True}


@pytest.mark.parametrize("targets,ensure_weight_tying", [(("embed_tokens", "q_proj"), False),
                                                         (("embed_tokens", "q_proj"), True), (("lm_head",), False)])
def test_embedding_lora_on_a_tied_model_matches_peft_forward(tmp_path, targets, ensure_weight_tying):
    a = make_adapter(tmp_path / "a", seed=1, targets=targets, model_kw=TIED, ensure_weight_tying=ensure_weight_tying)
    expected = peft_logits(a, **TIED)  # PEFT's forward: each of the two layers changes only if it is adapted
    base = tmp_path / "base"
    tiny_llama(0, **TIED).save_pretrained(str(base))
    report = combine([a], tmp_path / "full", "task_arithmetic", base=base, progress=False)
    torch.testing.assert_close(full_logits(tmp_path / "full"), expected, atol=1e-4, rtol=1e-4)
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["tie_word_embeddings"] is ensure_weight_tying and report["untied"] == ([] if ensure_weight_tying
                                                                                        else ["lm_head.weight"])
    # the in-memory patcher of search and grams
    model, adapter = tiny_llama(0, **TIED), load_adapter(a)
    plans = plan_modules([adapter])
    Patcher(model, plans).apply({p.name: adapter.delta(p.name) for p in plans})
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected, atol=1e-4, rtol=1e-4)


def test_full_fine_tune_and_embedding_lora_on_a_tied_model(tmp_path):
    """The fine-tune changes both tied layers, the LoRA only the embedding: the output is untied, lm_head = W0 +
    the fine-tune's change, the embedding = W0 + both."""
    base, ft = tmp_path / "base", tiny_llama(0, **TIED)
    ft.save_pretrained(str(base))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in ft.parameters():  # tied: the embedding's change is lm_head's too
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    ft.save_pretrained(str(tmp_path / "ft"))
    a = make_adapter(tmp_path / "a", seed=1, targets=("embed_tokens", "q_proj"), model_kw=TIED)
    combine([tmp_path / "ft", a], tmp_path / "m", "task_arithmetic", base=base, progress=False)
    lora = load_adapter(a)
    with torch.no_grad():
        ft.lm_head.weight = torch.nn.Parameter(ft.lm_head.weight.clone())
        ft.model.embed_tokens.weight += lora.delta("model.embed_tokens").T
        for k in lora.modules:
            if "embed" not in k:
                ft.get_submodule(k).weight += lora.delta(k)
        torch.testing.assert_close(full_logits(tmp_path / "m"), ft(IDS).logits, atol=1e-4, rtol=1e-4)


# --- 8. the output config's r, and exact zeros ------------------------------------------------------------------------

def test_output_r_is_the_largest_rank(tmp_path):
    a = make_adapter(tmp_path / "a", seed=1, r=2, alpha=4, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    b = make_adapter(tmp_path / "b", seed=2, r=8, alpha=8, targets=("q_proj",))
    combine([a, b], tmp_path / "m", "task_arithmetic", progress=False)
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert cfg["r"] == 10 and set(cfg["rank_pattern"].values()) == {2} and len(cfg["rank_pattern"]) == 6
    la, lb = load_adapter(a), load_adapter(b)
    ref = tiny_llama(0)
    with torch.no_grad():
        for k in la.modules:
            ref.get_submodule(k).weight += la.delta(k) + (lb.delta(k) if k in lb.modules else 0)
        torch.testing.assert_close(peft_logits(tmp_path / "m"), ref(IDS).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["task_arithmetic", "cat", "iso_c", "ties"])
def test_an_adapter_minus_itself_is_exactly_zero(tmp_path, method):
    a = make_adapter(tmp_path / "a", seed=1, r=8, alpha=16)
    combine([a, a], tmp_path / "m", method, weights=[1, -1], progress=False)
    out = load_adapter(tmp_path / "m")
    for k in out.modules:
        assert torch.count_nonzero(out.delta(k)) == 0, k


# --- 9. --seed is accepted by every method ----------------------------------------------------------------------------

@pytest.mark.parametrize("method", registry.names())
def test_every_method_accepts_and_records_a_seed(tmp_path, method):
    m = registry.get(method)
    assert m.resolve({"seed": 7}, 2)["seed"] == 7
    if m.needs_grams:
        return
    a, b = make_adapter(tmp_path / "a", seed=1), make_adapter(tmp_path / "b", seed=2)
    r = CliRunner().invoke(main, ["combine", str(a), str(b), "-o", str(tmp_path / "m"), "--method", method,
                                  "--seed", "7", "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m" / "merge_report.json").read_text())["params"]["seed"] == 7
