"""``train(config)``: one task adapter; ``train_many(yaml)``: a set of them; ``load_trained(folder)``: reload one.

The output folder holds what was trained (a PEFT adapter via ``save_pretrained``; for BitFit the biases
and head in ``bitfit_model.safetensors``), ``peftmerge.json`` (task metadata that merge and routing
read) and a model card.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..card import write_card
from ..errors import PeftmergeError
from ..io.atomic import atomic_dir, check_output
from ..io.meta import read_yaml
from . import base, methods
from .config import TrainConfig
from .data import ALPACA_PROMPT, default_template, load_task, sample_inputs
from .examples import classify_example, pack, text2text_example
from .trainer import label_word_accuracy, make_trainer

log = logging.getLogger(__name__)
META_FILE = "peftmerge.json"


@dataclass
class TrainResult:
    """What :func:`train` made: the output folder, its metadata, and the trained model (in eval mode)."""

    out: Path
    meta: dict
    model: Any = None
    tokenizer: Any = None
    history: list = dataclasses.field(default_factory=list)
    """The Trainer's log history (training loss per logging step, evaluations)."""

    @property
    def metrics(self) -> dict:
        return self.meta["metrics"]


def _template(config: TrainConfig, task) -> str | None:
    if task.format == "labelled":
        tpl = config.template or default_template(task.train)
        try:
            tpl.format(task="", labels="", text="", text_pair="")
        except (KeyError, IndexError, ValueError) as e:
            raise PeftmergeError(
                f"template {tpl!r}: bad placeholder {e}; use only {{task}}, {{labels}}, {{text}}, {{text_pair}}"
            ) from None
        return tpl
    return {"alpaca": ALPACA_PROMPT, "prompt": "{prompt}", "chat": "chat_template"}[task.format]


def _examples(rows, task, tokenizer, config: TrainConfig, shape: str, template: str | None) -> list[dict]:
    if shape == "classify":
        label2id = {l: i for i, l in enumerate(task.labels)}
        return [classify_example(r, tokenizer, label2id, config.max_length) for r in rows]
    return [text2text_example(r, task.format, tokenizer, config.max_length, config.train_on_inputs, template,
                              config.task, task.labels) for r in rows]


def _shape(config: TrainConfig, task, causal: bool, method) -> str:
    shape = config.shape or ("classify" if task.format == "labelled" and not causal else "text2text")
    if shape == "classify" and task.format != "labelled":
        raise PeftmergeError(f"data {task.source}: --shape classify needs text+label rows, not {task.format} rows")
    if shape == "text2text" and not causal:
        raise PeftmergeError(f"base model {config.model} cannot generate text; use --shape classify with labelled rows")
    if method.causal_only and shape != "text2text":
        raise PeftmergeError(f"method {method.name} trains causal LMs only; use --shape text2text or another method")
    return shape


def train(config: TrainConfig) -> TrainResult:
    """Train one adapter as ``config`` says and write it to ``config.out``."""
    import transformers

    from . import distill  # imports transformers' Trainer

    config.check()
    method = methods.get(config.method)
    inputs = [Path(p) for p in (config.data, config.validation) if p]
    if Path(config.model).exists():
        inputs.append(Path(config.model))
    out = check_output(config.out, inputs, config.overwrite)
    src, gguf = base.resolve(config.model, config.gguf_file)
    task = (distill.load_task if method.distill else load_task)(config)
    causal = base.can_generate(base.load_config(src, gguf))
    shape = _shape(config, task, causal, method)
    template = _template(config, task)
    tokenizer = base.load_tokenizer(src, gguf)
    if task.format == "chat" and not tokenizer.chat_template:
        raise PeftmergeError(f"base model {config.model}: its tokenizer has no chat template for 'messages' rows")
    make_examples = distill.examples if method.distill else _examples
    train_ex = make_examples(task.train, task, tokenizer, config, shape, template)
    val_ex = make_examples(task.validation, task, tokenizer, config, shape, template)
    if config.packing and shape == "text2text":
        train_ex = pack(train_ex, config.max_length)

    transformers.set_seed(config.seed)
    model = base.load_model(src, gguf, shape, task.labels if shape == "classify" else None, method.quantize_4bit,
                            config.dtype, tokenizer.pad_token_id)
    task_type = "SEQ_CLS" if shape == "classify" else "CAUSAL_LM"
    model = method.build(model, config, task_type)
    trainer = (distill.make_trainer if method.distill else make_trainer)(
        model, tokenizer, train_ex, val_ex, config, shape, left_pad=shape == "classify" and causal)

    metrics: dict = {}
    if val_ex and config.eval_before:
        metrics["eval_loss_before"] = trainer.evaluate()["eval_loss"]
    resume = None
    if config.resume:
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(str(config.checkpoints)) if config.checkpoints.is_dir() else None
        if resume is None:
            raise PeftmergeError(f"--resume: no checkpoint in {config.checkpoints}; drop --resume or pass --checkpoint-dir")
    out_train = trainer.train(resume_from_checkpoint=resume)
    metrics.update({k: v for k, v in out_train.metrics.items() if k in ("train_loss", "train_runtime",
                                                                        "train_samples_per_second", "epoch")})
    metrics["train_steps"] = trainer.state.global_step
    if val_ex:
        metrics.update({k: v for k, v in trainer.evaluate().items() if k in ("eval_loss", "eval_accuracy", "eval_macro_f1")})
        if shape == "text2text" and task.format == "labelled" and all("label" in r for r in task.validation):
            metrics["eval_accuracy"] = label_word_accuracy(model, tokenizer, task.validation, task.labels, template,
                                                           config.task, config.max_length, config.batch_size)
    model = trainer.model
    model.eval()

    recipe = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("out", "overwrite", "extra")}
    meta = {
        "task": config.task,
        "shape": shape,
        "format": task.format,
        "labels": task.labels,
        "label_words": {l: " " + l for l in task.labels} if shape == "text2text" and task.labels else None,
        "template": template if shape == "text2text" else None,
        "base_model": config.model,
        "gguf_file": gguf,
        "method": method.name,
        "mergeable": method.mergeable,
        "samples": sample_inputs(task.train, task.format, 256, config.seed),
        "metrics": {k: float(v) if isinstance(v, (int, float)) else v for k, v in metrics.items()},
        "config": recipe,
        "peftmerge_version": __version__,
    }
    if not trainer.is_world_process_zero():  # one writer under torchrun / accelerate launch: the main process
        trainer.accelerator.wait_for_everyone()
        return TrainResult(out=out, meta=meta, model=model, tokenizer=tokenizer, history=trainer.state.log_history)
    with atomic_dir(out, config.overwrite) as tmp:
        methods.save_trained(model, method, tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        results = {config.task: {k: v for k, v in meta["metrics"].items() if k.startswith(("eval_", "train_loss"))}}
        write_card(tmp, kind="adapter", base_model=config.model, recipe=recipe, results=results,
                   tags=[shape, method.name], title=f"{config.task} adapter ({method.name})")
    if not config.keep_checkpoints:
        shutil.rmtree(config.checkpoints, ignore_errors=True)
    log.info("wrote %s (%s)", out, ", ".join(f"{k}={v:.4g}" for k, v in meta["metrics"].items()))
    trainer.accelerator.wait_for_everyone()  # the other processes return once OUT exists
    return TrainResult(out=out, meta=meta, model=model, tokenizer=tokenizer, history=trainer.state.log_history)


def read_tasks(yaml_path: str | Path) -> list[TrainConfig]:
    """Configs from a ``train-many`` YAML: ``defaults`` (shared fields), ``output_dir`` and a ``tasks`` list.

    Each task is a mapping of :class:`TrainConfig` fields (``tasks`` may also map a task name to its fields).
    Relative ``data``/``validation``/``out`` paths (and an existing relative ``model``) are read from the
    YAML file's folder; ``out`` defaults to ``output_dir/<task>``.
    """
    path = Path(yaml_path)
    doc = read_yaml(path, "a tasks YAML file")
    if not isinstance(doc, dict) or not doc.get("tasks"):
        raise PeftmergeError(f"{path}: no 'tasks'; write a 'tasks:' list of tasks (task, data, ...)")
    bad = sorted(set(doc) - {"defaults", "output_dir", "tasks"})
    if bad:
        raise PeftmergeError(f"{path}: unknown top-level key(s) {', '.join(bad)}; use defaults, output_dir, tasks")
    tasks = doc["tasks"]
    if isinstance(tasks, dict):
        tasks = [{"task": name, **(fields or {})} for name, fields in tasks.items()]
    here = path.parent

    def rel(p):
        return str(p) if p is None or Path(p).is_absolute() else str(here / p)

    configs = []
    for i, t in enumerate(tasks, 1):
        if not isinstance(t, dict):
            raise PeftmergeError(f"{path}: task {i} is not a mapping of fields")
        d = {**(doc.get("defaults") or {}), **t}
        if "out" not in d and doc.get("output_dir") and d.get("task"):
            d["out"] = str(Path(doc["output_dir"]) / d["task"])
        for k in ("data", "validation", "out", "checkpoint_dir"):
            if d.get(k):
                d[k] = rel(d[k])
        if d.get("model") and (here / d["model"]).exists() and not Path(d["model"]).exists():
            d["model"] = rel(d["model"])
        configs.append(TrainConfig.from_dict(d, where=f"{path} task {i}").check())
    return configs


def train_many(yaml_path: str | Path, overwrite: bool = False) -> list[TrainResult]:
    """Train every task of a YAML file (see :func:`read_tasks`), one output folder each."""
    configs = read_tasks(yaml_path)
    outs = [Path(c.out).resolve() for c in configs]
    if len(set(outs)) != len(outs):
        raise PeftmergeError(f"{yaml_path}: two tasks write to the same output folder; give each its own 'out'")
    results = []
    for c in configs:
        c.overwrite = c.overwrite or overwrite
        r = train(c)
        results.append(TrainResult(out=r.out, meta=r.meta))  # drop the model: keep memory flat
    return results


def load_trained(folder: str | Path, model: str | None = None):
    """Reload a trained folder onto its base: ``(model, tokenizer, meta)``, the model in eval mode.

    ``model`` overrides the base recorded in ``peftmerge.json`` (e.g. a local copy of it).
    """
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise PeftmergeError(f"{folder}: no {META_FILE}; pass a folder written by peftmerge train")
    meta = json.loads(meta_path.read_text())
    src, gguf = base.resolve(model or meta["base_model"], None if model else meta.get("gguf_file"))
    method = methods.get(meta["method"])
    tokenizer = base.load_tokenizer(src, gguf)
    net = base.load_model(src, gguf, meta["shape"], meta["labels"], method.quantize_4bit,
                          meta.get("config", {}).get("dtype", "auto"), tokenizer.pad_token_id)
    if method.name == "bitfit":
        from safetensors.torch import load_file

        missing = set(load_file(str(folder / methods.BITFIT_FILE))) - set(net.state_dict())
        if missing:
            raise PeftmergeError(f"{folder}: tensors {sorted(missing)[:3]} are not in the base model; wrong base?")
        net.load_state_dict(load_file(str(folder / methods.BITFIT_FILE)), strict=False)
    else:
        from peft import PeftModel

        if method.quantize_4bit:
            methods.keep_trainable_layout(net)
        net = PeftModel.from_pretrained(net, str(folder))
    return net.eval(), tokenizer, meta
