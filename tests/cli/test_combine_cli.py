"""`peftmerge combine` / `peftmerge methods` through click's CliRunner, including every bad input."""

import json
import shutil

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import make_adapter
from peftmerge.cli.main import main
from peftmerge.merge import registry


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_error(result, out, *fragments):
    """Exit 2, one line naming the problem, no traceback, nothing written beside OUT."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]


@pytest.fixture
def two(tmp_path):
    return make_adapter(tmp_path / "a", seed=1), make_adapter(tmp_path / "b", seed=2, r=2)


@pytest.mark.parametrize("method", sorted(n for n in registry.names() if not registry.get(n).needs_grams))
def test_combine_each_method(two, tmp_path, method):  # regmean (needs --grams): tests/test_regmean.py
    out = tmp_path / "out"
    r = invoke("combine", *two, "-o", out, "--method", method, "--quiet")
    assert r.exit_code == 0, r.output
    assert (out / "adapter_model.safetensors").exists() and (out / "README.md").exists()
    report = json.loads((out / "merge_report.json").read_text())
    assert report["method"] == method and len(report["inputs"]) == 2


def test_combine_default_is_ties_with_paper_defaults(two, tmp_path):
    r = invoke("combine", *two, "-o", tmp_path / "out", "--weights", "0.5,1.5")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["method"] == "ties" and report["params"]["density"] == 0.2 and report["weights"] == [0.5, 1.5]
    assert "ties: merged 2 adapters" in r.output


def test_combine_accepts_safetensors_files(two, tmp_path):
    r = invoke("combine", two[0] / "adapter_model.safetensors", two[1] / "adapter_model.safetensors",
               "-o", tmp_path / "out", "--method", "cat", "--quiet")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["r"] == 6 and cfg["lora_alpha"] == 6


def test_methods_lists_every_method_with_defaults():
    r = invoke("methods")
    assert r.exit_code == 0
    for m in registry.methods():
        assert m.name in r.output
    assert "density=0.2" in r.output and "gamma=0.01" in r.output
    lines = {line.split(":")[0].split(" ")[0]: line for line in r.output.splitlines()}
    assert "[exact, factor space]" in lines["task_arithmetic"] and "factor space (SVDs" in lines["tsv"]
    assert "[exact, factor space; needs --grams]" in lines["regmean"] and "from the factors" in lines["ties"]
    assert "[full space: dense per module" in lines["pcb"] and "[Core Space, exact" in lines["wudi"]
    assert "[full space: per module from the factors" in lines["ties"]


def _corrupt(tmp_path, two, kind):
    bad = tmp_path / "bad"
    shutil.copytree(two[1], bad)
    f = bad / "adapter_model.safetensors"
    data = f.read_bytes()
    if kind == "text":
        f.write_text("hello, I am not a tensor file")
    elif kind == "truncated":
        f.write_bytes(data[: len(data) - 100])
    elif kind == "header":
        f.write_bytes(data[:8] + b"{" * (len(data) - 8))
    return bad


@pytest.mark.parametrize("kind,fragment", [("text", "not a safetensors file"), ("truncated", "truncated"),
                                           ("header", "corrupt safetensors header")])
def test_bad_files(two, tmp_path, kind, fragment):
    bad = _corrupt(tmp_path, two, kind)
    out = tmp_path / "out"
    assert_clean_error(invoke("combine", two[0], bad, "-o", out), out, fragment, "adapter_model.safetensors")


def test_debug_shows_traceback(two, tmp_path):
    bad = _corrupt(tmp_path, two, "text")
    r = invoke("combine", two[0], bad, "-o", tmp_path / "out", "--debug")
    assert r.exit_code != 0 and r.exc_info is not None and r.exc_info[0].__name__ == "PeftmergeError"


def test_missing_path(two, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(invoke("combine", two[0], tmp_path / "nope", "-o", out), out, "nope", "no such file")


def test_different_base_models_need_force(tmp_path):
    a = make_adapter(tmp_path / "a", seed=1, base_name="org/llama-a")
    b = make_adapter(tmp_path / "b", seed=2, base_name="org/llama-b")
    out = tmp_path / "out"
    assert_clean_error(invoke("combine", a, b, "-o", out), out, "different base models", "org/llama-b", "--force")
    assert invoke("combine", a, b, "-o", out, "--force", "--quiet").exit_code == 0


def test_shapes_disagree(tmp_path):
    a = make_adapter(tmp_path / "a", seed=1)
    b = make_adapter(tmp_path / "b", seed=2, model_kw={"hidden_size": 48})
    out = tmp_path / "out"
    assert_clean_error(invoke("combine", a, b, "-o", out), out, "shape", "q_proj")


def test_no_module_in_common(tmp_path):
    a = make_adapter(tmp_path / "a", seed=1, targets=("q_proj",))
    b = make_adapter(tmp_path / "b", seed=2, targets=("down_proj",))
    out = tmp_path / "out"
    assert_clean_error(invoke("combine", a, b, "-o", out), out, "no module in common", "--force")


def test_nan_in_tensor(two, tmp_path):
    bad = tmp_path / "nan"
    shutil.copytree(two[1], bad)
    state = load_file(str(bad / "adapter_model.safetensors"))
    key = next(iter(state))
    state[key][0, 0] = float("nan")
    save_file(state, str(bad / "adapter_model.safetensors"))
    out = tmp_path / "out"
    assert_clean_error(invoke("combine", two[0], bad, "-o", out, "--quiet"), out, "NaN", key)


def test_unknown_method_lists_valid(two, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(invoke("combine", *two, "-o", out, "--method", "tis"), out, "unknown merge method", "ties",
                       "dare_linear")


@pytest.mark.parametrize("args,fragment", [(("--density", "0"), "density 0.0 is out of range"),
                                           (("--density", "1.5"), "density 1.5 is out of range"),
                                           (("--rank", "-3"), "rank -3 must be a positive integer"),
                                           (("--weights", "1,2,3"), "3 weights for 2 inputs"),
                                           (("--weights", "1,x"), "--weights"),
                                           (("--method", "task_arithmetic", "--density", "0.5"), "takes no parameter"),
                                           (("--method", "cat", "--rank", "2"), "takes no --rank")])
def test_bad_parameters(two, tmp_path, args, fragment):
    out = tmp_path / "out"
    assert_clean_error(invoke("combine", *two, "-o", out, *args), out, fragment)


def test_out_is_an_input_or_exists(two, tmp_path):
    assert_clean_error(invoke("combine", *two, "-o", two[0]), tmp_path / "never", "is an input")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = invoke("combine", *two, "-o", out)
    assert r.exit_code == 2 and "--overwrite" in r.output and (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces an earlier output, never a folder peftmerge did not write
    r = invoke("combine", *two, "-o", out, "--overwrite", "--quiet")
    assert r.exit_code == 2 and "a folder peftmerge did not write" in r.output
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert invoke("combine", *two, "-o", out, "--quiet").exit_code == 2  # exists (empty): still needs --overwrite
    assert invoke("combine", *two, "-o", out, "--overwrite", "--quiet").exit_code == 0
    (out / "notes.txt").write_text("an earlier output may hold more")
    assert invoke("combine", *two, "-o", out, "--overwrite", "--quiet").exit_code == 0
    assert not (out / "notes.txt").exists() and (out / "adapter_config.json").exists()


def test_other_peft_type_is_refused(tmp_path):
    from peft import IA3Config, get_peft_model

    from conftest import tiny_llama

    get_peft_model(tiny_llama(), IA3Config(target_modules=["q_proj", "down_proj"],
                                           feedforward_modules=["down_proj"])).save_pretrained(str(tmp_path / "ia3"))
    out = tmp_path / "out"
    assert_clean_error(invoke("combine", tmp_path / "ia3", "-o", out), out, "IA3", "only LoRA")


def test_inputs_are_not_modified(two, tmp_path):
    before = {p: p.read_bytes() for a in two for p in a.iterdir()}
    assert invoke("combine", *two, "-o", tmp_path / "out", "--quiet").exit_code == 0
    assert {p: p.read_bytes() for a in two for p in a.iterdir()} == before


def test_interrupted_merge_leaves_nothing(two, tmp_path, monkeypatch):
    from peftmerge.io import adapter_writer

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(adapter_writer, "write_adapter", boom)
    out = tmp_path / "out"
    r = invoke("combine", *two, "-o", out)
    assert r.exit_code == 130 and not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_non_mergeable_trained_adapter_is_refused(two, tmp_path):
    bitfit = tmp_path / "bitfit"
    bitfit.mkdir()
    (bitfit / "peftmerge.json").write_text(json.dumps({"task": "sst2", "method": "bitfit", "mergeable": False}))
    out = tmp_path / "out"
    assert_clean_error(invoke("combine", two[0], bitfit, "-o", out), out, "bitfit adapter", "only LoRA")
