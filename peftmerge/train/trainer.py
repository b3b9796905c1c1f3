"""The training loop: transformers' ``Trainer`` (so ``accelerate launch`` / ``torchrun`` / DeepSpeed work).

We only choose the arguments (evaluation and checkpoint cadence, best-checkpoint selection, early
stopping, mixed precision on GPUs) and add two metrics: classification accuracy / macro-F1, and for
labelled rows trained as text2text, label-word accuracy by scoring each label's completion.

The evaluation schedule (shown by ``peftmerge train --help``) keeps evaluation under a tenth of a default
run: one evaluation after training on a sample of the validation rows sized to the run (:func:`eval_rows`),
none before or during training unless asked for (``eval_before``, ``eval_steps``) or needed to keep the best
checkpoint (``keep="best"``, early stopping).
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import PeftmergeError
from .config import EVAL_ROWS, EVAL_SHARE
from .distributed import cpu_launch
from .examples import IGNORE, Collator, text2text_example

log = logging.getLogger(__name__)

COMPLETE = "peftmerge-complete"  # written into a checkpoint folder once transformers has saved all of it
# TrainingArguments that would move or prune what peftmerge manages (the checkpoints folder).
RESERVED_ARGS = ("output_dir", "overwrite_output_dir", "save_total_limit", "logging_dir", "push_to_hub")


def classify_metrics(eval_pred) -> dict[str, float]:
    """Accuracy and macro-F1 of argmax predictions."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    pred = np.asarray(logits).argmax(-1)
    labels = np.asarray(labels)
    f1s = []
    for c in np.unique(np.concatenate([pred, labels])):
        tp = np.sum((pred == c) & (labels == c))
        denom = np.sum(pred == c) + np.sum(labels == c)
        f1s.append(2 * tp / denom if denom else 0.0)
    return {"accuracy": float(np.mean(pred == labels)), "macro_f1": float(np.mean(f1s))}


def eval_rows(config, n_train: int, label_words: int = 0) -> int | None:
    """How many validation rows the run evaluates on: ``max_eval_samples``, else :data:`EVAL_SHARE` of the rows it
    trains on (divided by ``1 + label_words`` when each row is scored once per label word), within
    :data:`EVAL_ROWS`."""
    if config.max_eval_samples:
        return config.max_eval_samples
    per_step = config.batch_size * config.grad_accum
    seen = config.max_steps * per_step if config.max_steps else config.epochs * n_train
    lo, hi = EVAL_ROWS
    return int(min(hi, max(lo, EVAL_SHARE * seen / (1 + label_words))))


def periodic_eval(config, has_eval: bool) -> bool:
    """Whether the run evaluates during training (asked for, or needed to keep the best checkpoint)."""
    return has_eval and bool(config.eval_steps or config.keeps_best)


def describe_schedule(config, n_val: int, n_total: int) -> str:
    """One line for the log: when the run evaluates, on how many rows, and which weights it keeps."""
    if not n_val:
        return "evaluation: none (no validation rows); keeping the last step's weights"
    when = ["after training"]
    if config.eval_before:
        when.insert(0, "before training")
    if periodic_eval(config, True):
        every = (f"every {config.eval_steps} steps" if config.eval_steps else
                 f"every {max(1, config.max_steps // 5)} steps" if config.max_steps else "each epoch")
        when.insert(-1, every)
    rows = f"{n_val} of {n_total} validation rows" + (" (--max-eval-samples to change)"
                                                      if not config.max_eval_samples and n_val < n_total else "")
    keep = ("the best checkpoint on validation" + (" (early stopping needs it)" if config.keep != "best" else "")
            if config.keeps_best else "the last step's weights (--keep best for the best checkpoint on validation)")
    return f"evaluation: {', '.join(when)} on {rows}; keeping {keep}"


def training_args(config, has_eval: bool, shape: str, progress: bool = True):
    """``TrainingArguments`` for ``config``: cadence, best checkpoint, precision, reproducibility."""
    from transformers import TrainingArguments

    if config.eval_steps or config.max_steps:
        strategy = "steps"
        every = config.eval_steps or max(1, config.max_steps // 5)
    else:
        strategy, every = "epoch", None
    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported() and config.dtype == "auto"
    kwargs = dict(
        output_dir=str(config.checkpoints),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        lr_scheduler_type=config.scheduler,
        weight_decay=config.weight_decay,
        logging_steps=config.logging_steps,
        eval_strategy=strategy if periodic_eval(config, has_eval) else "no",
        save_strategy=strategy,
        save_total_limit=2,
        seed=config.seed,
        data_seed=config.seed,
        bf16=gpu_bf16,
        report_to="none",
        remove_unused_columns=False,
        label_names=["labels"],  # PEFT wrappers hide the forward signature Trainer would read it from
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=cpu_launch(),  # torchrun / accelerate on CPUs: gloo data parallel, not N lone runs
    )
    # transformers 5 takes a warmup ratio as a float below 1 in warmup_steps; 4.x has warmup_ratio.
    known = inspect.signature(TrainingArguments).parameters
    warm = "warmup_ratio" if "warmup_ratio" in known else "warmup_steps"
    kwargs[warm] = config.warmup_ratio
    if every is not None:
        kwargs.update(eval_steps=every, save_steps=every)
    if config.gradient_checkpointing:  # only when asked: transformers 5 renames it (with a warning)
        kwargs["gradient_checkpointing"] = True
    if config.keeps_best and has_eval:
        best = "accuracy" if shape == "classify" else "loss"
        kwargs.update(load_best_model_at_end=True, metric_for_best_model=best, greater_is_better=best != "loss")
    kwargs.update(disable_tqdm=not progress)
    unknown = sorted(set(config.extra) - set(known))
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], list(known), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise PeftmergeError(f"--training-args: {', '.join(map(repr, unknown))} is not a transformers "
                             f"TrainingArguments field; {hint}see transformers' TrainingArguments")
    reserved = sorted(set(config.extra) & set(RESERVED_ARGS))
    if reserved:
        raise PeftmergeError(f"--training-args: {', '.join(reserved)} is set by peftmerge (use --checkpoint-dir, "
                             "--keep-checkpoints, --push-to-hub); drop it")
    kwargs.update(config.extra)
    try:
        return TrainingArguments(**kwargs)
    except (ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PeftmergeError(f"--training-args / training options refused by transformers: {first[:300]}") from None


def kept_weights(trainer, config) -> dict:
    """Which weights the run ends with: ``{"checkpoint": "last" | "best", "step", "why"}``."""
    state = trainer.state
    last = state.global_step
    best = state.best_model_checkpoint
    if config.keeps_best and best:
        step = int(best.rstrip("/").rsplit("-", 1)[-1])
        metric = trainer.args.metric_for_best_model
        return {"checkpoint": "best", "step": step, "why": (
            f"the best checkpoint on validation {metric}: step {step} of {last} ({metric} {state.best_metric:.4g})")}
    why = f"the last step's weights (step {last})"
    if config.keeps_best:
        why += "; no evaluation ran during training to pick a best checkpoint"
    return {"checkpoint": "last", "step": last, "why": why}


def mark_complete():
    """A callback that marks each checkpoint folder complete once transformers has written all of it
    (``on_save`` comes after the weights, optimizer, scheduler, RNG and trainer state), so that a resume
    never picks a half-written one (a run stopped by a full disk or a kill)."""
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                (folder / COMPLETE).write_text(f"{state.global_step}\n")

    return MarkComplete()


def make_trainer(model, tokenizer, train_examples, val_examples, config, shape: str, left_pad: bool = False,
                 progress: bool = True):
    """A ``Trainer`` over lists of tokenized examples, with early stopping when asked; ``progress=False``: no
    progress bar and no printed log lines."""
    from transformers import EarlyStoppingCallback, PrinterCallback, Trainer

    has_eval = bool(val_examples)
    callbacks = [mark_complete()]
    if config.early_stopping and has_eval:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping))
    trainer = Trainer(
        model=model,
        args=training_args(config, has_eval, shape, progress),
        train_dataset=train_examples,
        eval_dataset=val_examples or None,
        data_collator=Collator(tokenizer.pad_token_id, left=left_pad),
        processing_class=tokenizer,
        compute_metrics=classify_metrics if shape == "classify" else None,
        callbacks=callbacks,
    )
    if not progress:
        trainer.remove_callback(PrinterCallback)
    return trainer


@torch.no_grad()
def completion_logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of log p(token) over the completion tokens (labels != -100) of each sequence: (B,)."""
    ids, labels = batch["input_ids"], batch["labels"]
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    logits = logits[:, -ids.shape[1]:].float()  # prompt tuning prepends virtual tokens: keep the last T
    logp = torch.log_softmax(logits[:, :-1], dim=-1)  # (B, T-1, V): position t predicts token t+1
    target = labels[:, 1:]
    mask = target != IGNORE
    tok = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (tok * mask).sum(-1)


def label_word_accuracy(model, tokenizer, rows: list[dict], labels: list[str], template: str, task: str,
                        max_length: int, batch_size: int = 8) -> float:
    """Accuracy of picking the label whose completion (label word + EOS) is most likely after the prompt."""
    was_training = model.training
    model.eval()
    device = next(p.device for p in model.parameters())
    collate = Collator(tokenizer.pad_token_id)
    flat = [text2text_example({**row, "label": lab}, "labelled", tokenizer, max_length, False, template, task, labels)
            for row in rows for lab in labels]
    scores = []
    for i in tqdm(range(0, len(flat), batch_size), desc="label-word accuracy", leave=False):
        batch = {k: v.to(device) for k, v in collate(flat[i:i + batch_size]).items()}
        scores.append(completion_logprobs(model, batch).cpu())
    pred = torch.cat(scores).view(len(rows), len(labels)).argmax(-1)  # (N,)
    gold = torch.tensor([labels.index(str(r["label"])) for r in rows])
    model.train(was_training)
    return float((pred == gold).float().mean())
