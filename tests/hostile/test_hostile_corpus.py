"""Hostile input for every command, in-process: damaged and lying files, malicious pickles, wrong-typed configs,
NaN and infinity wherever a number goes in, outputs onto inputs in every form, symlinks, outputs that cannot be
written, binary and huge data files.

Every case must end the same way: exit code 2, one line on stderr starting with ``Error:``, no traceback, no
output (not even a hidden temporary one) and every input byte for byte as it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from hostile_world import build_world, copy, damage_safetensors, malicious_pickle, snapshot

from peftmerge.cli.main import main



@pytest.fixture(scope="module")
def w(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


def S(p) -> str:
    return str(p)


def bad(w, d, kind, src="a"):
    """A copy of adapter ``src`` in the case folder with its weights damaged as ``kind`` says."""
    folder = copy(getattr(w, src), d / f"bad-{src}")
    damage_safetensors(folder / "adapter_model.safetensors", kind)
    return folder


def with_config(w, d, src="a", **changes):
    """A copy of adapter ``src`` whose adapter_config.json has ``changes`` (a value of ... : removed)."""
    folder = copy(getattr(w, src), d / f"cfg-{src}")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def with_meta(w, d, src="sent", text=None, **changes):
    folder = copy(getattr(w, src), d / f"meta-{src}")
    meta = json.loads((folder / "peftmerge.json").read_text())
    meta.update(changes)
    (folder / "peftmerge.json").write_text(text if text is not None else json.dumps(meta))
    return folder


def pickled_adapter(w, d, src="a"):
    """An adapter folder with only adapter_model.bin: a pickle that would create PWNED if loaded."""
    folder = copy(getattr(w, src), d / f"pickle-{src}")
    (folder / "adapter_model.safetensors").unlink()
    malicious_pickle(folder / "adapter_model.bin", d / "PWNED")
    return folder


def pickled_model(w, d):
    folder = copy(w.bert, d / "pickle-model")
    (folder / "model.safetensors").unlink()
    malicious_pickle(folder / "pytorch_model.bin", d / "PWNED")
    return folder


def router_with(w, d, text=None, **changes):
    folder = copy(w.router, d / "router")
    cfg = json.loads((folder / "router.json").read_text())
    for k, v in changes.items():
        if k in ("top_k", "temperature", "abstain", "layer"):
            cfg["params"][k] = v
        else:
            cfg[k] = v
    (folder / "router.json").write_text(text if text is not None else json.dumps(cfg))
    return folder


def write(d, name, content) -> Path:
    p = d / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return p


BINARY = bytes(range(256)) * 64
LATIN1 = '{"text": "caf\xe9 cr\xe8me", "label": "positive"}\n'.encode("latin-1")
HUGE = b'{"text": "' + b"a" * (8 << 20)  # 8 MB, one line, never closed


def unwritable(d):
    return Path("/sys/peftmerge-hostile/out")  # the kernel refuses anything new here, even to root


def under_file(d):
    write(d, "afile", "x")
    return d / "afile" / "out"


def too_long(d):
    return d / ("n" * 300)


def dangling(d):
    os.symlink(d / "nowhere", d / "dangling")
    return d / "dangling"


BAD_OUTPUTS = {"unwritable": unwritable, "parent-is-a-file": under_file, "name-too-long": too_long,
               "dangling-symlink": dangling}


# --- the commands, each with a good set of arguments to damage --------------------------------------------------

def combine(w, d, *inputs, out=None, extra=()):
    return ["combine", *map(S, inputs or (w.a, w.b)), "-o", S(out or d / "out"), *extra]


def inspect_(w, d, *inputs, out=None, extra=()):
    return ["inspect", *map(S, inputs or (w.a, w.b)), "-o", S(out or d / "out"), *extra]


def route_build(w, d, *adapters, out=None, extra=()):
    return ["route", "build", *map(S, adapters or (w.sent, w.topic)), "-o", S(out or d / "out"),
            "--examples", f"sent={w.sent_val}", "--examples", f"topic={w.topic_val}", *extra]


def grams(w, d, *adapters, out=None, data=None, extra=()):
    data = data or {"sent": w.sent_val, "topic": w.topic_val}
    return ["grams", *map(S, adapters or (w.sent, w.topic)), "-o", S(out or d / "g.safetensors"), "--model", S(w.bert),
            *[x for t, f in data.items() for x in ("--data", f"{t}={f}")], *extra]


def search(w, d, *adapters, out=None, data=None, extra=()):
    data = data or {"sent": w.sent_val, "topic": w.topic_val}
    return ["search", *map(S, adapters or (w.sent, w.topic)), "-o", S(out or d / "out"), "--model", S(w.bert),
            "--method", "task_arithmetic", "--grid", "lambda=0.5",
            *[x for t, f in data.items() for x in ("--data", f"{t}={f}")], *extra]


def eval_(w, d, adapter=None, model=None, data=None, out=None, extra=()):
    data = data or {"sent": w.sent_val}
    args = ["eval", "--model", S(model or w.bert), "--adapter", S(adapter or w.sent),
            *[x for t, f in data.items() for x in ("--data", f"{t}={f}")]]
    return args + (["-o", S(out)] if out else []) + list(extra)


def predict(w, d, router=None, input_=None, out=None, extra=()):
    return ["predict", "--router", S(router or w.router), "--input", S(input_ or w.sent_val), "-o",
            S(out or d / "p.jsonl"), "--route-only", *extra]


def route_eval(w, d, router=None, data=None, out=None, extra=()):
    data = data or {"sent": w.sent_val}
    args = ["route", "eval", "--router", S(router or w.router),
            *[x for t, f in data.items() for x in ("--data", f"{t}={f}")]]
    return args + (["-o", S(out)] if out else []) + list(extra)


def train(w, d, data=None, out=None, model=None, extra=()):
    return ["train", "--model", S(model or w.llama), "--data", S(data or w.train), "--task", "t", "-o",
            S(out or d / "out"), "--max-steps", "1", "--r", "2", "--target-modules", "q_proj", *extra]


def train_many(w, d, yaml_text):
    return ["train-many", S(write(d, "tasks.yaml", yaml_text))]


def report(w, d, *files, out=None, extra=()):
    return ["eval", "report", *map(S, files or (w.results,)), "-o", S(out or d / "rep"), *extra]


def push(w, d, folder=None, repo="bob/x", extra=()):
    return ["push", S(folder or w.merged), "--repo-id", repo, *extra]


# --- the corpus --------------------------------------------------------------------------------------------------

CASES: dict[str, tuple] = {}


def case(name, build, fragment=None, marks=()):
    assert name not in CASES, name
    CASES[name] = (build, fragment, marks)


# damaged, truncated and lying safetensors: every reader of adapters
HEADER_KINDS = ["empty", "text", "truncated", "header_not_json", "header_length_huge", "header_is_a_list",
                "unknown_dtype", "lying_offsets", "offsets_past_end", "negative_shape", "shape_not_a_list", "folder"]
for k in HEADER_KINDS + ["nan", "inf", "rank0", "missing_b", "dora"]:
    case(f"combine-safetensors-{k}", lambda w, d, k=k: combine(w, d, bad(w, d, k), w.b))
for k in ["text", "truncated", "unknown_dtype", "lying_offsets", "nan", "rank0"]:
    case(f"inspect-safetensors-{k}", lambda w, d, k=k: inspect_(w, d, bad(w, d, k), w.b))
for k in ["empty", "truncated", "unknown_dtype", "lying_offsets", "negative_shape", "rank0"]:
    case(f"route-build-safetensors-{k}", lambda w, d, k=k: route_build(w, d, bad(w, d, k, "sent"), w.topic))
for k in ["text", "truncated", "unknown_dtype", "lying_offsets", "offsets_past_end", "nan", "folder"]:
    case(f"eval-safetensors-{k}", lambda w, d, k=k: eval_(w, d, adapter=bad(w, d, k, "sent")))
for k in ["truncated", "lying_offsets", "nan"]:
    case(f"grams-safetensors-{k}", lambda w, d, k=k: grams(w, d, bad(w, d, k, "sent"), w.topic))
    case(f"search-safetensors-{k}", lambda w, d, k=k: search(w, d, bad(w, d, k, "sent"), w.topic))
case("push-dry-run-safetensors-lying", lambda w, d: push(w, d, bad(w, d, "lying_offsets", "sent"),
                                                          extra=["--dry-run"]))

# malicious pickles: refused unread wherever weights are read
case("combine-pickle-adapter", lambda w, d: combine(w, d, pickled_adapter(w, d), w.b), "pickle")
case("inspect-pickle-adapter", lambda w, d: inspect_(w, d, pickled_adapter(w, d), w.b), "pickle")
case("route-build-pickle-adapter", lambda w, d: route_build(w, d, pickled_adapter(w, d, "sent"), w.topic), "pickle")
case("eval-pickle-adapter", lambda w, d: eval_(w, d, adapter=pickled_adapter(w, d, "sent")), "pickle")
case("grams-pickle-adapter", lambda w, d: grams(w, d, pickled_adapter(w, d, "sent"), w.topic), "pickle")
case("search-pickle-adapter", lambda w, d: search(w, d, pickled_adapter(w, d, "sent"), w.topic), "pickle")
case("eval-pickle-model", lambda w, d: eval_(w, d, model=pickled_model(w, d)), "pickle")
case("route-build-pickle-model", lambda w, d: route_build(w, d, extra=["--model", S(pickled_model(w, d))]))
case("train-pickle-model", lambda w, d: train(w, d, model=pickled_model(w, d)))
case("combine-pickle-grams", lambda w, d: combine(w, d, extra=["--method", "regmean", "--grams",
                                                               S(malicious_pickle(d / "g.safetensors", d / "PWNED"))]))
case("predict-pickle-router-tensors",
     lambda w, d: predict(w, d, router=_pickled_router(w, d)))
case("route-eval-pickle-router-tensors", lambda w, d: route_eval(w, d, router=_pickled_router(w, d)))
case("train-resume-pickle-checkpoint", lambda w, d: train(w, d, extra=["--resume", "--checkpoint-dir",
                                                                       S(_pickled_checkpoint(w, d))]))


def _pickled_router(w, d):
    folder = copy(w.router, d / "router")
    malicious_pickle(folder / "router.safetensors", d / "PWNED")
    return folder


def _pickled_checkpoint(w, d):
    """A checkpoints folder claimed for this output, whose one complete checkpoint holds pickles only."""
    folder = d / "ckpt"
    step = folder / "checkpoint-1"
    step.mkdir(parents=True)
    (folder / "peftmerge-checkpoints.json").write_text(json.dumps({"out": str((d / "out").resolve()),
                                                                    "created": True}))
    (step / "peftmerge-complete").write_text("1\n")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        malicious_pickle(step / name, d / "PWNED")
    return folder


# wrong-typed configs and metadata
case("combine-config-alpha-string", lambda w, d: combine(w, d, with_config(w, d, lora_alpha="sixteen"), w.b),
     "lora_alpha 'sixteen'")
case("combine-config-r-string", lambda w, d: combine(w, d, with_config(w, d, r="four"), w.b), "r 'four'")
case("combine-config-rslora-string", lambda w, d: combine(w, d, with_config(w, d, use_rslora="yes"), w.b))
case("combine-config-alpha-pattern-list", lambda w, d: combine(w, d, with_config(w, d, alpha_pattern=[1]), w.b))
case("combine-config-alpha-nan", lambda w, d: combine(w, d, _raw_config(w, d, '{"peft_type": "LORA", '
                                                                             '"lora_alpha": NaN}'), w.b))
case("combine-config-not-json", lambda w, d: combine(w, d, _raw_config(w, d, "{nope"), w.b), "not valid JSON")
case("combine-config-a-list", lambda w, d: combine(w, d, _raw_config(w, d, "[1, 2]"), w.b))
case("combine-config-binary", lambda w, d: combine(w, d, _raw_config(w, d, BINARY), w.b))
case("combine-config-peft-type-number", lambda w, d: combine(w, d, with_config(w, d, peft_type=3), w.b))
case("inspect-config-alpha-string", lambda w, d: inspect_(w, d, with_config(w, d, lora_alpha="sixteen"), w.b))
case("route-build-config-alpha-string",
     lambda w, d: route_build(w, d, with_config(w, d, "sent", lora_alpha="sixteen"), w.topic))
case("eval-config-not-json", lambda w, d: eval_(w, d, adapter=_raw_config(w, d, "{nope", src="sent")))
case("eval-config-a-list", lambda w, d: eval_(w, d, adapter=_raw_config(w, d, "[]", src="sent")))
case("eval-config-r-string", lambda w, d: eval_(w, d, adapter=with_config(w, d, "sent", r="four")))
case("combine-meta-task-number", lambda w, d: combine(w, d, w.sent, with_meta(w, d, "topic", task=5)))
case("combine-meta-not-json", lambda w, d: combine(w, d, w.sent, with_meta(w, d, "topic", text="{nope")))
case("route-build-meta-labels-string", lambda w, d: route_build(w, d, with_meta(w, d, labels="neg,pos"), w.topic))
case("route-build-meta-shape-bogus", lambda w, d: route_build(w, d, with_meta(w, d, shape="regress"), w.topic))
case("eval-meta-labels-string", lambda w, d: eval_(w, d, adapter=with_meta(w, d, labels="neg,pos")))
case("eval-meta-binary", lambda w, d: eval_(w, d, adapter=with_meta(w, d, text=BINARY.decode("latin-1"))))


def _raw_config(w, d, text, src="a"):
    folder = copy(getattr(w, src), d / f"raw-{src}")
    write(folder, "adapter_config.json", text)
    return folder


def recipe(w, d, body):
    return ["combine", "--config", S(write(d, "recipe.yaml", body)), "-o", S(d / "out")]


MODELS = "models:\n  - model: {a}\n  - model: {b}\n"
case("combine-recipe-weight-abc", lambda w, d: recipe(w, d, f"models:\n  - model: {w.a}\n    parameters: "
                                                            f"{{weight: abc}}\n  - model: {w.b}\n"))
case("combine-recipe-density-string", lambda w, d: recipe(w, d, "merge_method: ties\nparameters: {density: high}\n"
                                                                + MODELS.format(a=w.a, b=w.b)), "not a number")
case("combine-recipe-models-not-list", lambda w, d: recipe(w, d, "models: 5\n"))
case("combine-recipe-not-mapping", lambda w, d: recipe(w, d, "- a\n- b\n"))
case("combine-recipe-python-tag", lambda w, d: recipe(w, d, "models: !!python/object/apply:os.system ['touch "
                                                            f"{d / 'PWNED'}']\n"), "not valid YAML")
case("combine-recipe-binary", lambda w, d: ["combine", "--config", S(write(d, "r.yaml", BINARY)), "-o", S(d / "o")])
case("combine-recipe-unknown-key", lambda w, d: recipe(w, d, "mergemethod: ties\n" + MODELS.format(a=w.a, b=w.b)))
case("combine-recipe-method-number", lambda w, d: recipe(w, d, "merge_method: 5\n" + MODELS.format(a=w.a, b=w.b)))

TASK = "tasks:\n  - {{task: t, data: {data}, model: {model}, out: {out}, max_steps: 1{extra}}}\n"


def yaml_task(w, d, extra):
    return train_many(w, d, TASK.format(data=w.train, model=w.llama, out=d / "out", extra=extra))


for name, extra, fragment in [("alpha-string", ", alpha: sixteen", "alpha 'sixteen'"),
                              ("epochs-negative", ", epochs: -1", "epochs"),
                              ("max-steps-string", ", max_steps: ten", "max_steps 'ten'"),
                              ("lr-nan", ", lr: .nan", "lr nan"), ("lr-inf", ", lr: .inf", "lr inf"),
                              ("labels-string", ", labels: 'neg,pos'", "labels"),
                              ("dropout-big", ", dropout: 3", "dropout"),
                              ("r-float", ", r: 2.5", "r 2.5"), ("unknown-key", ", learning_rate: 1", "unknown key"),
                              ("data-number", ", data: 5", None), ("overwrite-string", ", overwrite: 'no'", None),
                              ("target-modules-number", ", target_modules: 7", None)]:
    case(f"train-many-{name}", lambda w, d, extra=extra: yaml_task(w, d, extra), fragment)
case("train-many-tasks-number", lambda w, d: train_many(w, d, "tasks: 5\n"))
case("train-many-task-list", lambda w, d: train_many(w, d, "tasks:\n  - [a, b]\n"))
case("train-many-defaults-list", lambda w, d: train_many(w, d, "defaults: [1]\ntasks:\n  - {task: t}\n"))
case("train-many-fields-list", lambda w, d: train_many(w, d, "tasks:\n  t: [1, 2]\n"))
case("train-many-output-dir-number", lambda w, d: train_many(w, d, f"output_dir: 5\ntasks:\n  - {{task: t, data: "
                                                                   f"{w.train}, model: {w.llama}}}\n"))
case("train-many-binary", lambda w, d: ["train-many", S(write(d, "t.yaml", BINARY))])
case("train-many-python-tag", lambda w, d: train_many(w, d, f"tasks: !!python/object/apply:os.system ['touch "
                                                            f"{d / 'PWNED'}']\n"))

for name, changes, text in [("top-k-string", {"top_k": "two"}, None), ("temperature-string", {"temperature": "hot"},
                                                                      None),
                            ("temperature-zero", {"temperature": 0}, None), ("top-k-zero", {"top_k": 0}, None),
                            ("abstain-list", {"abstain": [1]}, None), ("params-list", {"params": [1]}, None),
                            ("adapters-not-list", {"adapters": "sent"}, None),
                            ("adapters-empty", {"adapters": []}, None),
                            ("adapter-no-path", {"adapters": [{"task": "sent"}]}, None),
                            ("strategy-number", {"strategy": 5}, None), ("strategy-unknown", {"strategy": "knn"}, None),
                            ("base-model-number", {"base_model": 5}, None), ("format-wrong", {"format": "x"}, None),
                            ("not-json", {}, "{nope"), ("binary", {}, BINARY.decode("latin-1"))]:
    case(f"predict-router-{name}", lambda w, d, c=changes, t=text: predict(w, d, router=router_with(w, d, t, **c)))
for name, text in [("temperature-nan", "NaN"), ("temperature-inf", "Infinity"), ("temperature-negative", "-1")]:
    case(f"route-eval-router-{name}", lambda w, d, t=text: route_eval(w, d, router=router_with(
        w, d, json.dumps(json.loads((w.router / "router.json").read_text())).replace(
            '"temperature": 0.1', f'"temperature": {t}'))), "temperature")
case("predict-router-tensors-nan", lambda w, d: predict(w, d, router=_nan_router(w, d)), "NaN or Inf")


def _nan_router(w, d):
    from safetensors.torch import load_file, save_file

    folder = copy(w.router, d / "router")
    state = load_file(str(folder / "router.safetensors"))
    key = next(iter(state))
    state[key] = state[key] * float("nan")
    save_file(state, str(folder / "router.safetensors"))
    return folder


def task_json(d, labels_json, rows=None):
    """A data file with a task.json beside it."""
    write(d, "task/task.json", labels_json)
    return write(d, "task/validation.jsonl", "".join(json.dumps(r) + "\n" for r in (rows or [
        {"text": "good", "label": "positive"}, {"text": "bad", "label": "negative"}])))


case("train-task-json-labels-string", lambda w, d: train(w, d, data=task_json(d, '{"labels": "positive"}')))
case("train-task-json-binary", lambda w, d: train(w, d, data=task_json(d, BINARY)))
case("eval-task-json-labels-string", lambda w, d: eval_(w, d, data={"sent": task_json(d, '{"labels": 5}')},
                                                        adapter=with_meta(w, d, labels=None)))
case("eval-task-json-not-json", lambda w, d: eval_(w, d, data={"sent": task_json(d, "{nope")},
                                                   adapter=with_meta(w, d, labels=None)))
for name, text in [("not-json", "{nope"), ("binary", BINARY), ("tasks-list", '{"name": "x", "tasks": []}'),
                   ("metric-string", '{"name": "x", "tasks": {"a": {"accuracy": "high"}}}'),
                   ("name-number", '{"name": 5, "tasks": {"a": {"accuracy": 0.5}}}'),
                   ("no-primary-metric", '{"name": "x", "tasks": {"a": {"f1": 0.5}}}'),
                   ("average-list", '{"name": "x", "tasks": {"a": {"accuracy": 0.5}}, "average": [1]}'),
                   ("baseline-tasks-list", '{"name": "x", "tasks": {"a": {"accuracy": 0.5}}, '
                                           '"baselines": {"b": {"tasks": [1]}}}')]:
    case(f"report-results-{name}", lambda w, d, t=text: report(w, d, write(d, "r.json", t)))
case("eval-reference-results-not-json", lambda w, d: eval_(w, d, extra=["--reference-results",
                                                                       S(write(d, "r.json", "{nope"))]))

for name, value in [("list", "[1]"), ("not-json", "{nope"), ("unknown-key", '{"learning_rat": 1}'),
                    ("reserved-key", '{"output_dir": "/"}'), ("bad-value", '{"eval_strategy": "sometimes"}'),
                    ("number", "5")]:
    case(f"train-training-args-{name}", lambda w, d, v=value: train(w, d, extra=["--training-args", v]),
         "--training-args")

# NaN, infinity and out-of-range numbers
for opt, value, marks in [("--lambda", "nan", []), ("--lambda", "inf", []),
                          ("--density", "nan", []), ("--density", "0", []), ("--density", "1.5", []),
                          ("--weights", "nan,1", []), ("--weights", "inf,1", []), ("--weights", "1,abc", []),
                          ("--alpha", "nan", []), ("--alpha", "inf", []), ("--rank", "0", []), ("--rank", "-3", [])]:
    case(f"combine{opt}-{value}", lambda w, d, o=opt, v=value: combine(w, d, extra=[o, v]), marks=marks)
case("combine--gamma-inf", lambda w, d: combine(w, d, extra=["--method", "breadcrumbs", "--gamma", "inf"]))
case("combine-nan-in-recipe", lambda w, d: recipe(w, d, "merge_method: ties\nparameters: {lambda: .nan}\n"
                                                        + MODELS.format(a=w.a, b=w.b)), marks=[])
for opt, value, fragment in [("--temperature", "nan", "not a finite number"), ("--temperature", "inf", None),
                             ("--temperature", "0", "temperature 0.0 is out of range: must be > 0.0"),
                             ("--temperature", "-1", "must be > 0"), ("--abstain", "nan", None), ("--top-k", "0", None),
                             ("--max-examples", "0", None), ("--layer", "nan", None)]:
    case(f"route-build{opt}-{value}", lambda w, d, o=opt, v=value: route_build(w, d, extra=[o, v]), fragment)
case("route-build--hidden-negative", lambda w, d: route_build(w, d, extra=["--strategy", "probe", "--hidden", "-1"]))
case("route-build--steps-zero", lambda w, d: route_build(w, d, extra=["--strategy", "probe", "--steps", "0"]))
for opt, value in [("--lr", "nan"), ("--lr", "0"), ("--lr", "inf"), ("--epochs", "-1"), ("--epochs", "nan"),
                   ("--epochs", "0"), ("--alpha", "inf"), ("--alpha", "-4"), ("--dropout", "nan"), ("--dropout", "1.5"),
                   ("--warmup-ratio", "2"), ("--val-fraction", "nan"), ("--weight-decay", "-1"),
                   ("--max-steps", "0"), ("--r", "0"), ("--batch-size", "0"), ("--seed", "-1"),
                   ("--logging-steps", "0"), ("--max-length", "0"), ("--max-samples", "0"), ("--eval-steps", "0"),
                   ("--grad-accum", "0"), ("--max-eval-samples", "0")]:
    case(f"train{opt}-{value}", lambda w, d, o=opt, v=value: train(w, d, extra=[o, v]))
for opt, value, marks in [("--sigma", "nan", []), ("--sigma", "0", []), ("--lr", "inf", []), ("--l1", "nan", []),
                          ("--grid", "lambda=nan", []), ("--limit", "0", []), ("--batch-size", "0", []),
                          ("--budget", "0", []), ("--lambda", "nan", []), ("--max-length", "0", [])]:
    case(f"search{opt}-{value}", lambda w, d, o=opt, v=value: search(w, d, extra=[o, v]), marks=marks)
for opt, value in [("--density", "nan"), ("--density", "inf"), ("--density", "0"), ("--alpha", "nan")]:
    case(f"inspect{opt}-{value}", lambda w, d, o=opt, v=value: inspect_(w, d, extra=[o, v]))
for opt, value in [("--limit", "0"), ("--batch-size", "0"), ("--max-length", "0"), ("--max-new-tokens", "0"),
                   ("--icl-shots", "-1"), ("--seed", "-1")]:
    case(f"eval{opt}-{value}", lambda w, d, o=opt, v=value: eval_(w, d, extra=[o, v]))
for opt, value in [("--limit", "0"), ("--batch-size", "0"), ("--max-length", "0"), ("--alpha", "nan")]:
    case(f"grams{opt}-{value}", lambda w, d, o=opt, v=value: grams(w, d, extra=[o, v]))
for opt, value in [("--batch-size", "0"), ("--max-new-tokens", "0")]:
    case(f"predict{opt}-{value}", lambda w, d, o=opt, v=value: predict(w, d, extra=[o, v]))
case("route-eval--limit-0", lambda w, d: route_eval(w, d, extra=["--limit", "0"]))
for command in ("combine", "methods", "push"):
    for value in ("0", "-1", "nan"):
        case(f"{command}--threads-{value}", lambda w, d, c=command, v=value: {
            "combine": combine(w, d, extra=["--threads", v]), "methods": ["methods", "--threads", v],
            "push": push(w, d, extra=["--threads", v, "--dry-run"])}[c])

# outputs onto inputs: is, contains, lies inside, through a symlink
case("combine-out-is-input", lambda w, d: combine(w, d, (a := copy(w.a, d / "a")), w.b, out=a,
                                                  extra=["--overwrite"]), "is an input")
case("combine-out-contains-input", lambda w, d: combine(w, d, copy(w.a, d / "p" / "a"), w.b, out=d / "p",
                                                        extra=["--overwrite"]), "contains an input")
case("combine-out-inside-input", lambda w, d: combine(w, d, (a := copy(w.a, d / "a")), w.b, out=a / "merged"),
     "lies inside an input")
case("combine-out-inside-input-via-symlink", lambda w, d: combine(w, d, (a := copy(w.a, d / "a")), w.b,
                                                                  out=_link(d, a) / "merged"), "lies inside an input")
case("combine-out-symlink-to-input", lambda w, d: combine(w, d, (a := copy(w.a, d / "a")), w.b, out=_link(d, a),
                                                          extra=["--overwrite"]), "symbolic link")
case("combine-out-contains-config", lambda w, d: ["combine", "--config", S(copy(w.recipe, d / "c" / "r.yaml")), "-o",
                                                  S(d / "c"), "--overwrite"], "contains an input")
case("combine-out-is-input-file", lambda w, d: combine(w, d, (f := copy(w.a / "adapter_model.safetensors",
                                                                        d / "x" / "f.safetensors")), out=f,
                                                       extra=["--alpha", "8", "--overwrite"]), "is an input")
case("inspect-out-inside-input", lambda w, d: inspect_(w, d, (a := copy(w.a, d / "a")), w.b, out=a / "x"))
case("inspect-out-is-input", lambda w, d: inspect_(w, d, (a := copy(w.a, d / "a")), w.b, out=a,
                                                   extra=["--overwrite"]))
case("route-build-out-inside-input", lambda w, d: route_build(w, d, (s := copy(w.sent, d / "sent")), w.topic,
                                                              out=s / "router"))
case("route-build-out-contains-examples", lambda w, d: ["route", "build", S(w.sent), S(w.topic), "-o", S(d / "e"),
                                                        "--overwrite", "--examples",
                                                        f"sent={copy(w.sent_val, d / 'e' / 'v.jsonl')}",
                                                        "--examples", f"topic={w.topic_val}"], "contains an input")
case("grams-out-is-adapter-weights", lambda w, d: grams(w, d, (s := copy(w.sent, d / "sent")), w.topic,
                                                        out=s / "adapter_model.safetensors", extra=["--overwrite"]))
case("grams-out-is-data", lambda w, d: grams(w, d, data={"sent": (v := copy(w.sent_val, d / "v.safetensors")),
                                                         "topic": w.topic_val}, out=v, extra=["--overwrite"]))
case("search-out-inside-input", lambda w, d: search(w, d, (s := copy(w.sent, d / "sent")), w.topic, out=s / "best"))
case("search-out-contains-data", lambda w, d: search(w, d, data={"sent": copy(w.sent_val, d / "o" / "v.jsonl"),
                                                                 "topic": w.topic_val}, out=d / "o",
                                                     extra=["--overwrite"]))
case("eval-out-is-adapter-config", lambda w, d: eval_(w, d, adapter=(s := copy(w.sent, d / "sent")),
                                                      out=s / "adapter_config.json", extra=["--overwrite"]),
     "lies inside an input")
case("eval-out-is-data", lambda w, d: eval_(w, d, data={"sent": (v := copy(w.sent_val, d / "v.json"))}, out=v,
                                            extra=["--overwrite"]), "is an input")
case("eval-out-md-is-input", lambda w, d: eval_(w, d, data={"sent": copy(w.sent_val, d / "v.md")},
                                                out=d / "v.json", extra=["--overwrite"]), "is an input")
case("eval-out-inside-model", lambda w, d: eval_(w, d, model=(m := copy(w.bert, d / "bert")), out=m / "r.json"))
case("predict-out-is-input", lambda w, d: predict(w, d, input_=(q := copy(w.sent_val, d / "q.jsonl")), out=q,
                                                  extra=["--overwrite"]), "is an input")
case("predict-out-inside-router", lambda w, d: predict(w, d, router=(r := copy(w.router, d / "r")),
                                                       out=r / "p.jsonl"))
case("route-eval-out-is-data", lambda w, d: route_eval(w, d, data={"sent": (v := copy(w.sent_val, d / "v.json"))},
                                                       out=v, extra=["--overwrite"]), "is an input")
case("route-eval-out-exists", lambda w, d: route_eval(w, d, out=write(d, "r.json", "{}")), "--overwrite")
case("report-out-contains-results", lambda w, d: report(w, d, copy(w.results, d / "rep" / "r.json"), out=d / "rep",
                                                        extra=["--overwrite"]), "contains an input")
case("train-out-inside-task-folder", lambda w, d: train(w, d, data=(t := _task_folder(w, d)), out=t / "adapter"))
case("train-out-is-model", lambda w, d: train(w, d, model=(m := copy(w.llama, d / "m")), out=m,
                                              extra=["--overwrite"]))
case("train-checkpoints-inside-model", lambda w, d: train(w, d, model=(m := copy(w.llama, d / "m")),
                                                          extra=["--checkpoint-dir", S(m / "ckpt")]))
case("train-checkpoints-inside-out", lambda w, d: train(w, d, extra=["--checkpoint-dir", S(d / "out" / "ckpt")]))
case("train-checkpoints-of-another-run", lambda w, d: train(w, d, extra=["--checkpoint-dir", S(_foreign(d))]),
     "did not write")
case("train-checkpoints-a-file", lambda w, d: train(w, d, extra=["--checkpoint-dir", S(write(d, "ck", "x"))]))
case("train-resume-nothing", lambda w, d: train(w, d, extra=["--resume"]), "--resume")
case("train-out-named-like-a-checkpoint", lambda w, d: train(w, d, out=d / "checkpoint-7",
                                                             extra=["--checkpoint-dir", S(d)]))
case("combine-overwrite-a-foreign-folder", lambda w, d: combine(w, d, out=_foreign(d), extra=["--overwrite"]),
     "did not write")
case("combine-overwrite-a-file", lambda w, d: combine(w, d, out=write(d, "notes.txt", "mine"), extra=["--overwrite"]),
     "is a file")
case("inspect-overwrite-a-foreign-folder", lambda w, d: inspect_(w, d, out=_foreign(d), extra=["--overwrite"]))
case("combine-overwrite-the-working-folder", lambda w, d: combine(w, d, out=Path.cwd(), extra=["--overwrite"]))


def _link(d, target, name="link"):
    os.symlink(target, d / name)
    return d / name


def _task_folder(w, d):
    folder = d / "task"
    copy(w.train, folder / "train.jsonl")
    return folder


def _foreign(d):
    folder = d / "theirs"
    (folder / "checkpoint-5").mkdir(parents=True)
    write(folder, "checkpoint-5/weights.bin", "someone else's")
    return folder


# outputs that cannot be written: checked before the work
WRITERS = {
    "combine": lambda w, d, out: combine(w, d, out=out),
    "inspect": lambda w, d, out: inspect_(w, d, out=out),
    "route-build": lambda w, d, out: route_build(w, d, out=out),
    "grams": lambda w, d, out: grams(w, d, out=Path(str(out) + ".safetensors")),
    "search": lambda w, d, out: search(w, d, out=out),
    "eval": lambda w, d, out: eval_(w, d, out=Path(str(out) + ".json")),
    "predict": lambda w, d, out: predict(w, d, out=out),
    "route-eval": lambda w, d, out: route_eval(w, d, out=out),
    "report": lambda w, d, out: report(w, d, out=out),
    "train": lambda w, d, out: train(w, d, out=out),
}
for command, build in WRITERS.items():
    for name, where in BAD_OUTPUTS.items():
        if command in ("grams", "eval") and name == "dangling-symlink":
            continue  # their output names take a suffix: covered below
        case(f"{command}-out-{name}", lambda w, d, b=build, f=where: b(w, d, f(d)))
case("grams-out-dangling-symlink", lambda w, d: grams(w, d, out=_link(d, d / "nowhere", "g.safetensors")))
case("eval-out-dangling-symlink", lambda w, d: eval_(w, d, out=_link(d, d / "nowhere", "r.json")))

# binary, non-UTF-8 and huge data files
DATA_FILES = {"binary": BINARY, "latin-1": LATIN1, "huge-line": HUGE, "json-list": b"[1, 2]\n",
              "nested-deep": b"[" * 100000 + b"\n"}
for name, content in DATA_FILES.items():
    case(f"eval-data-{name}", lambda w, d, c=content: eval_(w, d, data={"sent": write(d, "d.jsonl", c)}))
    case(f"train-data-{name}", lambda w, d, c=content: train(w, d, data=write(d, "d.jsonl", c)))
for name in ("binary", "latin-1"):
    content = DATA_FILES[name]
    case(f"grams-data-{name}", lambda w, d, c=content: grams(w, d, data={"sent": write(d, "v.jsonl", c),
                                                                         "topic": w.topic_val}))
    case(f"search-data-{name}", lambda w, d, c=content: search(w, d, data={"sent": write(d, "v.jsonl", c),
                                                                           "topic": w.topic_val}))
    case(f"route-build-examples-{name}", lambda w, d, c=content: ["route", "build", S(w.sent), S(w.topic), "-o",
                                                                  S(d / "out"), "--examples",
                                                                  f"sent={write(d, 'e.jsonl', c)}"])
    case(f"predict-input-{name}", lambda w, d, c=content: predict(w, d, input_=write(d, "q.jsonl", c)))
    case(f"route-eval-data-{name}", lambda w, d, c=content: route_eval(w, d, data={"sent": write(d, "q.jsonl", c)}))
case("train-data-binary-json", lambda w, d: train(w, d, data=write(d, "d.json", BINARY)))
case("train-data-binary-csv", lambda w, d: train(w, d, data=write(d, "d.csv", BINARY)))
case("train-data-binary-parquet", lambda w, d: train(w, d, data=write(d, "d.parquet", BINARY)))
case("train-data-no-label", lambda w, d: train(w, d, data=write(d, "d.jsonl", '{"text": "a"}\n{"x": 1}\n')))

# misc: unknown names, missing values, wrong combinations
case("combine-unknown-method", lambda w, d: combine(w, d, extra=["--method", "tiez"]), "did you mean 'ties'")
case("search-unknown-method", lambda w, d: search(w, d, extra=["--method", "tiez"]), "did you mean 'ties'")
case("train-unknown-method", lambda w, d: train(w, d, extra=["--method", "lorra"]), "did you mean 'lora'")
case("route-build-unknown-router", lambda w, d: route_build(w, d, extra=["--strategy", "centriod"]),
     "did you mean 'centroid'")
case("unknown-command", lambda w, d: ["combin", S(w.a)], "Did you mean 'combine'")
case("unknown-option", lambda w, d: combine(w, d, extra=["--methd", "ties"]), "--method")
case("combine-no-inputs", lambda w, d: ["combine", "-o", S(d / "out")])
case("combine-missing-input", lambda w, d: combine(w, d, d / "nope", w.b), "no such")
case("combine-input-symlink-loop", lambda w, d: combine(w, d, _loop(d), w.b))
case("inspect-one-input", lambda w, d: inspect_(w, d, w.a))
case("eval-no-model", lambda w, d: ["eval", "--data", f"sent={w.sent_val}"], "--model is required")
case("eval-adapter-and-router", lambda w, d: eval_(w, d, extra=["--router", S(w.router)]), "not both")
case("eval-data-not-a-pair", lambda w, d: ["eval", "--model", S(w.bert), "--data", S(w.sent_val)])
case("eval-missing-adapter", lambda w, d: eval_(w, d, adapter=d / "nope"))
case("eval-router-binary", lambda w, d: ["eval", "--model", S(w.bert), "--router", S(router_with(
    w, d, BINARY.decode("latin-1"))), "--data", f"sent={w.sent_val}"])
case("report-no-files", lambda w, d: ["eval", "report", "-o", S(d / "rep")])
case("route-eval-unknown-task", lambda w, d: route_eval(w, d, data={"nope": w.sent_val}))
case("route-eval-data-twice", lambda w, d: route_eval(w, d, data={"sent": w.sent_val}, extra=[
    "--data", f"sent={w.topic_val}"]), "twice")
case("push-bad-repo-id", lambda w, d: push(w, d, repo="not a repo"))
case("push-repo-id-climbing-revision", lambda w, d: push(w, d, repo="user/name@../../etc"))
case("push-revision-climbing", lambda w, d: push(w, d, extra=["--revision", "../../x"]), "--revision")
case("push-revision-climbing-dry-run", lambda w, d: push(w, d, extra=["--revision", "../x", "--dry-run"]))
case("push-not-an-output", lambda w, d: push(w, d, folder=write(d, "junk/notes.txt", "x").parent))
case("push-missing-folder", lambda w, d: push(w, d, folder=d / "nope"))
case("push-broken-meta", lambda w, d: push(w, d, folder=with_meta(w, d, text="{nope"), extra=["--dry-run"]))
case("push-offline", lambda w, d: push(w, d))
case("methods-extra-argument", lambda w, d: ["methods", "ties"])
case("train-shape-bogus", lambda w, d: train(w, d, extra=["--shape", "regress"]))
case("train-template-bad", lambda w, d: train(w, d, extra=["--template", "{txt}"]), "bad placeholder")
case("train-missing-data", lambda w, d: train(w, d, data=d / "nope.jsonl"))
case("train-model-missing", lambda w, d: train(w, d, model=d / "no-model"))


# extract: a LoRA adapter from a full fine-tune
def extract(w, d, ft=None, base=None, out=None, extra=("--rank", "2")):
    return ["extract", S(ft or w.llama_ft), "--base", S(base or w.llama), "-o", S(out or d / "out"), *extra]


def damaged_model(w, d, kind):
    folder = copy(w.llama_ft, d / "ft")
    weights = next(folder.glob("*.safetensors"))
    if kind in ("nan", "inf"):  # one weight of the fine-tune is not finite
        from safetensors.torch import load_file, save_file

        state = load_file(str(weights))
        name = next(k for k in state if k.endswith("q_proj.weight"))
        state[name][0, 0] = float(kind)
        save_file(state, str(weights), metadata={"format": "pt"})
    else:
        damage_safetensors(weights, kind)
    return folder


for k in ["empty", "text", "truncated", "unknown_dtype", "lying_offsets", "offsets_past_end", "nan", "inf"]:
    case(f"extract-safetensors-{k}", lambda w, d, k=k: extract(w, d, ft=damaged_model(w, d, k)))
case("extract-pickle-model", lambda w, d: extract(w, d, ft=pickled_model(w, d), base=w.bert), "pickle")
for opt, value in [("--rank", "0"), ("--rank", "-3"), ("--energy", "nan"), ("--energy", "inf"), ("--energy", "0"),
                   ("--energy", "1.5")]:
    case(f"extract-{opt[2:]}-{value}", lambda w, d, o=opt, v=value: extract(w, d, extra=[o, v]))
case("extract-no-rank-or-energy", lambda w, d: extract(w, d, extra=()))
case("extract-other-architecture", lambda w, d: extract(w, d, base=w.bert))
case("extract-adapter-not-a-model", lambda w, d: extract(w, d, ft=w.a))
case("extract-missing-model", lambda w, d: extract(w, d, ft=d / "nope"))
case("extract-unknown-module", lambda w, d: extract(w, d, extra=["--rank", "2", "--modules", "no_such_proj"]))
case("extract-out-is-base", lambda w, d: extract(w, d, base=(b := copy(w.llama, d / "base")), out=b,
                                                 extra=["--rank", "2", "--overwrite"]))
case("extract-out-inside-finetuned", lambda w, d: extract(w, d, ft=(f := copy(w.llama_ft, d / "ft")), out=f / "lora"))
for name, where in BAD_OUTPUTS.items():
    case(f"extract-out-{name}", lambda w, d, f=where: extract(w, d, out=f(d)))


def _loop(d):
    os.symlink(d / "loop2", d / "loop1")
    os.symlink(d / "loop1", d / "loop2")
    return d / "loop1"


COMMANDS = ("combine", "inspect", "route-build", "route-eval", "predict", "grams", "search", "eval", "report",
            "train", "train-many", "push", "methods", "extract")


def test_the_corpus_covers_every_command():
    assert len(CASES) >= 150, len(CASES)
    for command in COMMANDS:
        assert any(n.startswith(command + "-") for n in CASES), command


@pytest.mark.parametrize("name", [pytest.param(n, marks=m) for n, (_, _, m) in CASES.items()])
def test_hostile_input(name, w, tmp_path, monkeypatch):
    build, fragment, _ = CASES[name]
    d = tmp_path / "case"
    d.mkdir()
    monkeypatch.chdir(d)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    args = build(w, d)
    before = snapshot(w.root, d)
    r = CliRunner().invoke(main, [str(a) for a in args])
    after = snapshot(w.root, d)
    lines = r.stderr.strip().splitlines()
    shown = f"{name}: exit {r.exit_code}\nstdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-3000:]}\n{r.exception!r}"
    assert r.exit_code == 2, shown
    assert len(lines) == 1 and lines[0].startswith("Error: "), shown
    assert "Traceback" not in r.output, shown
    assert r.stdout == "", shown
    if fragment:
        assert fragment in lines[0], shown
    assert not (d / "PWNED").exists(), "a pickle was unpickled"
    assert after == before, f"{name}: files changed or were left behind: " + ", ".join(
        sorted(set(after.items()) ^ set(before.items()), key=str)[:6].__repr__().split(", ")[:6])
