"""``train(config)``: one task adapter; ``train_many(yaml)``: a set of them; ``load_trained(folder)``: reload one.

The output folder holds what was trained (a PEFT adapter via ``save_pretrained``; for BitFit the biases
and head in ``bitfit_model.safetensors``; for a full fine-tune the whole model and its tokenizer),
``peftmerge.json`` (task metadata that merge and routing read) and a model card.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..version import __version__
from ..errors import PeftmergeError
from ..io.atomic import as_disk_error, atomic_dir, check_output
from ..io.base_model import describe as describe_base
from ..io.card import write_card
from ..io.checkpoint import refuse_pickle_weights
from ..io.meta import read_yaml
from ..io import model_loader as base
from . import methods
from .config import TrainConfig
from .data import ALPACA_PROMPT, default_task_name, default_template, load_task, sample_inputs, sample_rows
from .examples import classify_example, pack, text2text_example
from .trainer import COMPLETE, describe_schedule, eval_rows, kept_weights, label_word_accuracy, make_trainer

log = logging.getLogger(__name__)
META_FILE = "peftmerge.json"
OWNER = "peftmerge-checkpoints.json"  # in the checkpoints folder: which output its checkpoint-N folders belong to


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


def _step(folder: Path) -> int | None:
    tail = folder.name.removeprefix("checkpoint-")
    return int(tail) if folder.name.startswith("checkpoint-") and tail.isdigit() else None


def _checkpoint_folders(folder: Path) -> list[Path]:
    """``checkpoint-N`` folders in ``folder`` (what transformers writes and rotates), by step."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and not p.is_symlink() and _step(p) is not None]
    return sorted(found, key=_step)


def last_complete_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint of the highest step that transformers finished writing (None when there is none)."""
    done = [p for p in _checkpoint_folders(Path(folder)) if (p / COMPLETE).is_file()]
    return done[-1] if done else None


def _owner(folder: Path) -> dict:
    try:
        data = json.loads((folder / OWNER).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _check_checkpoints(config: TrainConfig, out: Path, inputs: list[Path]) -> Path | None:
    """Refuse a checkpoints folder whose use could lose a file; with ``resume``, the checkpoint to resume from.

    Checkpoints go to ``checkpoint-N`` folders that transformers rotates (deletes), and peftmerge removes them
    on success: so the folder may hold no ``checkpoint-N`` that another run wrote, may not be or lie inside an
    input, and may not lie inside the output (replaced at the end)."""
    folder = config.checkpoints
    resolved, out_resolved = folder.resolve(), out.resolve()
    if folder.exists() and not folder.is_dir():
        raise PeftmergeError(f"--checkpoint-dir {folder} is a file; pass a folder")
    if resolved == out_resolved or out_resolved in resolved.parents:
        raise PeftmergeError(f"--checkpoint-dir {folder} lies inside the output {out}; put checkpoints elsewhere")
    if out_resolved.parent == resolved and _step(out_resolved) is not None:
        raise PeftmergeError(f"output {out} is named like a checkpoint in --checkpoint-dir {folder}; rename it")
    for p in inputs:
        p = p.resolve()
        if resolved == p or p in resolved.parents:
            raise PeftmergeError(f"--checkpoint-dir {folder} is or lies inside the input {p}; put checkpoints "
                                 "elsewhere (inputs are never modified)")
    owner = _owner(folder)
    # this output's runs wrote them; or peftmerge did, for another output, and --resume takes them over
    ours = owner.get("out") == str(out_resolved) or (config.resume and bool(owner.get("out")))
    theirs = [p.name for p in _checkpoint_folders(folder)] if not ours else []
    if theirs:
        raise PeftmergeError(f"--checkpoint-dir {folder} holds {', '.join(theirs[:3])} that this output's runs did "
                             "not write (transformers would rotate them away); pass an empty or new folder")
    if not config.resume:
        return None
    last = last_complete_checkpoint(folder) if ours else None
    if last is None:
        half = [p.name for p in _checkpoint_folders(folder)]
        what = f"only half-written ones ({', '.join(half)}), no" if half else "no"
        raise PeftmergeError(f"--resume: no checkpoint in {folder} to resume from ({what} complete ones); drop "
                             "--resume to start over, or pass the --checkpoint-dir of the interrupted run")
    return last


def _claim_checkpoints(folder: Path, out: Path, created: bool) -> None:
    """Record that ``folder``'s checkpoint-N folders belong to ``out``'s runs (``created``: this run made the
    folder); drop half-written ones (a killed or disk-full run of ``out`` left them: resuming never starts there)."""
    owner = _owner(folder)
    if owner.get("out"):  # this output's folder, or another output's that --resume takes over
        created = owner.get("created")
    record = {"out": str(out.resolve()), "created": bool(created)}
    if owner != record:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / OWNER).write_text(json.dumps(record) + "\n")
    for p in _checkpoint_folders(folder):
        if not (p / COMPLETE).is_file():
            shutil.rmtree(p, ignore_errors=True)


def _release_checkpoints(folder: Path, everything: bool, created: bool = False) -> None:
    """Remove what this output's runs wrote in ``folder``: its checkpoint-N folders (``everything``; else only
    if none was completed, so that --resume has what it needs), the ownership record, and the folder itself
    when peftmerge made it (``created``, or as recorded) and it is empty."""
    if (folder / OWNER).is_file():
        checkpoints = _checkpoint_folders(folder)
        if not everything and any((p / COMPLETE).is_file() for p in checkpoints):
            return
        created = bool(_owner(folder).get("created"))
        for p in checkpoints:
            shutil.rmtree(p, ignore_errors=True)
        (folder / OWNER).unlink(missing_ok=True)
    if created:
        try:
            folder.rmdir()
        except OSError:  # not empty (it holds something else), or not there
            pass


def _during_save(e: BaseException) -> bool:
    """Whether ``e`` was raised while transformers wrote a checkpoint."""
    names = {frame.f_code.co_name for frame, _ in traceback.walk_tb(e.__traceback__)}
    return bool(names & {"_save_checkpoint", "save_model", "_save", "_save_optimizer_and_scheduler",
                         "_save_rng_state", "save_to_json"})


def _train_failure(e: BaseException, config: TrainConfig, resume) -> PeftmergeError | None:
    """One line for a training run stopped by the disk (a checkpoint or the output could not be written) or by
    an unreadable checkpoint on --resume; None for anything else."""
    folder = config.checkpoints
    disk = as_disk_error(e, folder / "checkpoint")
    if disk is not None or (_during_save(e) and isinstance(e, (OSError, RuntimeError))):
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return PeftmergeError(f"training stopped: writing a checkpoint in {folder} failed ({first}); free space or "
                              "raise the file size limit, then run the same command with --resume")
    if resume is not None and isinstance(e, (OSError, RuntimeError, ValueError, KeyError)) or \
            type(e).__name__ == "UnpicklingError":
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return PeftmergeError(f"--resume: checkpoint {resume} cannot be read ({first}); delete it to resume from an "
                              "earlier one, or drop --resume")
    return None


def train(config: TrainConfig, progress: bool = True) -> TrainResult:
    """Train one adapter as ``config`` says and write it to ``config.out``; ``progress=False``: no progress bar
    and no printed log lines.

    Checkpoints go to ``config.checkpoints``; on success peftmerge removes the ones this output's runs wrote
    (never anything else), unless ``keep_checkpoints``. ``resume`` continues from the last checkpoint that was
    completely written."""
    import transformers

    from . import distill  # imports transformers' Trainer

    named = bool(config.task)
    config.check()
    if not named:
        log.debug("task name %r: the data folder's name (pass --task to choose another)", config.task)
    method = methods.get(config.method)
    masked = method.masked and config.density < 1
    if masked and config.resume:
        raise PeftmergeError(f"--resume: {method.name} with density {config.density} calibrates its mask in a first "
                             "phase that is not checkpointed; run again without --resume (or with --density 1)")
    inputs = [Path(p) for p in (config.data, config.validation) if p]
    if Path(config.model).exists():
        inputs.append(Path(config.model))
    out = check_output(config.out, inputs, config.overwrite)
    resume = _check_checkpoints(config, out, inputs)
    refuse_pickle_weights(config.model)
    src, gguf = base.resolve(config.model, config.gguf_file)
    task = (distill.load_task if method.distill else load_task)(config)
    causal = base.can_generate(base.load_config(src, gguf))
    shape = _shape(config, task, causal, method)
    template = _template(config, task)
    label_words = len(task.labels) if shape == "text2text" and task.format == "labelled" else 0
    n_val = len(task.validation)
    task.validation = sample_rows(task.validation, eval_rows(config, len(task.train), label_words), config.seed)
    schedule = describe_schedule(config, len(task.validation), n_val)
    log.debug(schedule)
    tokenizer = base.load_tokenizer(src, gguf)
    if task.format == "chat" and not tokenizer.chat_template:
        raise PeftmergeError(f"base model {config.model}: its tokenizer has no chat template for 'messages' rows")
    make_examples = distill.examples if method.distill else _examples
    train_ex = make_examples(task.train, task, tokenizer, config, shape, template)
    val_ex = make_examples(task.validation, task, tokenizer, config, shape, template)
    if config.packing and shape == "text2text":
        train_ex = pack(train_ex, config.max_length)

    transformers.set_seed(config.resolved_init_seed())  # the head's and the LoRA factors' initial values
    model = base.load_model(src, gguf, shape, task.labels if shape == "classify" else None, method.quantize_4bit,
                            config.dtype, tokenizer.pad_token_id)
    task_type = "SEQ_CLS" if shape == "classify" else "CAUSAL_LM"
    model = method.build(model, config, task_type)
    based_on = describe_base(config.model, str(Path(src) / gguf) if gguf else src)
    for peft_config in (getattr(model, "peft_config", None) or {}).values():  # adapter_config.json's base
        peft_config.base_model_name_or_path = based_on["base_model"]
    if masked:  # LoRI-S: a dense first phase calibrates the mask of B, then B restarts from zero under it
        from . import lori

        lori.apply_masks(model, lori.calibrate(model, config, lambda c: make_trainer(
            model, tokenizer, train_ex, [], c, shape, left_pad=shape == "classify" and causal, progress=progress)))
    made = not config.checkpoints.exists()  # transformers makes the folder when the Trainer is built
    try:
        trainer = (distill.make_trainer if method.distill else make_trainer)(
            model, tokenizer, train_ex, val_ex, config, shape, left_pad=shape == "classify" and causal,
            progress=progress)
        metrics: dict = {}
        if val_ex and config.eval_before:
            metrics["eval_loss_before"] = trainer.evaluate()["eval_loss"]
        _claim_checkpoints(config.checkpoints, out, created=made)
        out_train = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    except BaseException as e:
        _release_checkpoints(config.checkpoints, everything=False, created=made)
        explained = _train_failure(e, config, resume)
        if explained is not None:
            raise explained from e
        raise
    metrics.update({k: v for k, v in out_train.metrics.items() if k in ("train_loss", "train_runtime",
                                                                        "train_samples_per_second", "epoch")})
    metrics["train_steps"] = trainer.state.global_step
    kept = kept_weights(trainer, config)
    log.debug("kept %s", kept["why"])
    if method.masked:
        from .lori import density_of

        metrics["b_density"] = density_of(trainer.model)  # fraction of B's entries that are nonzero
    if val_ex:
        metrics.update({k: v for k, v in trainer.evaluate().items() if k in ("eval_loss", "eval_accuracy", "eval_macro_f1")})
        if shape == "text2text" and task.format == "labelled" and all("label" in r for r in task.validation):
            metrics["eval_accuracy"] = label_word_accuracy(model, tokenizer, task.validation, task.labels, template,
                                                           config.task, config.max_length, config.batch_size)
    model = trainer.model
    model.eval()

    recipe = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("out", "overwrite", "extra")}
    recipe["model"] = based_on["base_model"]
    meta = {
        "task": config.task,
        "shape": shape,
        "format": task.format,
        "labels": task.labels,
        "label_words": {l: " " + l for l in task.labels} if shape == "text2text" and task.labels else None,
        "template": template if shape == "text2text" else None,
        "base_model": based_on["base_model"],
        "base_fingerprint": based_on["base_fingerprint"],
        "gguf_file": gguf,
        "method": method.name,
        "mergeable": method.mergeable,
        "samples": sample_inputs(task.train, task.format, 256, config.seed),
        "metrics": {k: float(v) if isinstance(v, (int, float)) else v for k, v in metrics.items()},
        "evaluation": schedule,
        "kept": kept,
        "init_seed": config.resolved_init_seed(),
        "config": recipe,
        "peftmerge_version": __version__,
    }
    if not trainer.is_world_process_zero():  # one writer under torchrun / accelerate launch: the main process
        trainer.accelerator.wait_for_everyone()
        return TrainResult(out=out, meta=meta, model=model, tokenizer=tokenizer, history=trainer.state.log_history)
    with atomic_dir(out, config.overwrite) as tmp:
        methods.save_trained(model, method, tmp, tokenizer)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        results = {config.task: {k: v for k, v in meta["metrics"].items() if k.startswith(("eval_", "train_loss"))}}
        write_card(tmp, kind="adapter", base_model=based_on["base_model"], recipe=recipe, results=results,
                   tags=[shape, method.name], title=f"{config.task} adapter ({method.name})")
    if not config.keep_checkpoints:
        _release_checkpoints(config.checkpoints, everything=True)
    log.debug("wrote %s (%s)", out, ", ".join(f"{k}={v:.4g}" for k, v in meta["metrics"].items()))
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
    if not isinstance(doc.get("defaults") or {}, dict):
        raise PeftmergeError(f"{path}: 'defaults' is not a mapping of fields")
    if doc.get("output_dir") is not None and not isinstance(doc["output_dir"], str):
        raise PeftmergeError(f"{path}: 'output_dir' {doc['output_dir']!r} is not a folder path")
    if isinstance(tasks, dict):
        if not all(isinstance(f, dict) or f is None for f in tasks.values()):
            raise PeftmergeError(f"{path}: each task under 'tasks' must be a mapping of fields")
        tasks = [{"task": name, **(fields or {})} for name, fields in tasks.items()]
    if not isinstance(tasks, list):
        raise PeftmergeError(f"{path}: 'tasks' is not a list of tasks (task, data, ...)")
    here = path.parent

    def rel(p):
        return str(p) if p is None or Path(p).is_absolute() else str(here / p)

    configs = []
    for i, t in enumerate(tasks, 1):
        if not isinstance(t, dict):
            raise PeftmergeError(f"{path}: task {i} is not a mapping of fields")
        d = {**(doc.get("defaults") or {}), **t}
        wrong = next((k for k in ("task", "data", "validation", "out", "checkpoint_dir", "model")
                      if d.get(k) is not None and not isinstance(d[k], str)), None)
        if wrong:
            raise PeftmergeError(f"{path} task {i}: {wrong} {d[wrong]!r} is not a string; fix the YAML value")
        if not d.get("task") and d.get("data"):
            d["task"] = default_task_name(rel(d["data"]))
        if "out" not in d and doc.get("output_dir") and d.get("task"):
            d["out"] = str(Path(doc["output_dir"]) / d["task"])
        for k in ("data", "validation", "out", "checkpoint_dir"):
            if d.get(k):
                d[k] = rel(d[k])
        if d.get("model") and (here / d["model"]).exists() and not Path(d["model"]).exists():
            d["model"] = rel(d["model"])
        configs.append(TrainConfig.from_dict(d, where=f"{path} task {i}").check())
    return configs


def train_many(yaml_path: str | Path, overwrite: bool = False, progress: bool = True) -> list[TrainResult]:
    """Train every task of a YAML file (see :func:`read_tasks`), one output folder each."""
    configs = read_tasks(yaml_path)
    outs = [Path(c.out).resolve() for c in configs]
    if len(set(outs)) != len(outs):
        raise PeftmergeError(f"{yaml_path}: two tasks write to the same output folder; give each its own 'out'")
    results = []
    for c in configs:
        c.overwrite = c.overwrite or overwrite
        r = train(c, progress=progress)
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
    if method.name == "full":  # the folder is the whole fine-tuned model
        src, gguf = str(folder), None
    tokenizer = base.load_tokenizer(src, gguf)
    net = base.load_model(src, gguf, meta["shape"], meta["labels"], method.quantize_4bit,
                          meta.get("config", {}).get("dtype", "auto"), tokenizer.pad_token_id)
    if method.name == "bitfit":
        from safetensors.torch import load_file

        missing = set(load_file(str(folder / methods.BITFIT_FILE))) - set(net.state_dict())
        if missing:
            raise PeftmergeError(f"{folder}: tensors {sorted(missing)[:3]} are not in the base model; wrong base?")
        net.load_state_dict(load_file(str(folder / methods.BITFIT_FILE)), strict=False)
    elif method.name != "full":
        from peft import PeftModel

        if method.quantize_4bit:
            methods.keep_trainable_layout(net)
        net = PeftModel.from_pretrained(net, str(folder))
    return net.eval(), tokenizer, meta
