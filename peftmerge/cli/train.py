"""``peftmerge train`` and ``peftmerge train-many``: thin layers over :mod:`peftmerge.train`."""

from __future__ import annotations

import logging

import click

from .common import Command, common_options, is_quiet, show_progress
from .push import maybe_push, push_to_hub_option


def _echo_result(r) -> None:
    if is_quiet():
        return
    m = r.meta["metrics"]
    shown = ", ".join(f"{k}={m[k]:.4f}" for k in ("train_loss", "eval_loss", "eval_accuracy") if k in m)
    click.echo(f"{r.meta['task']}: wrote {r.out} ({r.meta['method']}, {r.meta['shape']}; {shown})")
    click.echo(f"{r.meta['evaluation']}\nkept {r.meta['kept']['why']}")


@click.command("train", cls=Command, log_level=logging.INFO)
@click.option("--model", required=True, help="Base model: local folder, Hub id, or .gguf file.")
@click.option("--gguf-file", default=None, help="GGUF file name inside the --model folder.")
@click.option("--data", required=True, help="Training rows: .jsonl/.json/.csv/.parquet, a datasets folder, or a task folder.")
@click.option("--validation", default=None, help="Validation rows (same formats).")
@click.option("--val-fraction", type=float, default=0.0, show_default=True, help="Hold out this fraction when no validation file.")
@click.option("--task", default=None,
              help="Task name (stored in peftmerge.json). Default: the data folder's name (printed).")
@click.option("-o", "--out", required=True, help="Output adapter folder.")
@click.option("--method", default="lora", show_default=True,
              help="lora, qlora, dora, lori, prompt_tuning, ia3, bitfit, llama_adapter, full, context_distillation.")
@click.option("--shape", type=click.Choice(["text2text", "classify"]), default=None,
              help="Default: classify for labelled rows on an encoder, else text2text.")
@click.option("--labels", default=None, help="Label names in order, comma-separated (default: task.json or sorted).")
@click.option("--template", default=None, help="Prompt template for labelled rows in text2text ({task} {labels} {text} {text_pair}).")
@click.option("--r", "--lora-r", "r", type=int, default=16, show_default=True,
              help="LoRA rank (--lora-r under torchrun / accelerate launch, whose parsers take --r for their own).")
@click.option("--alpha", type=float, default=32.0, show_default=True, help="LoRA alpha.")
@click.option("--dropout", type=float, default=0.05, show_default=True, help="LoRA dropout.")
@click.option("--target-modules", default=None, help="Comma-separated module names, or all-linear.")
@click.option("--rslora", is_flag=True, help="Rank-stabilised LoRA scaling alpha/sqrt(r).")
@click.option("--density", type=float, default=0.1, show_default=True,
              help="lori: fraction of B's entries the task mask keeps (1: LoRI-D, B dense).")
@click.option("--calibration-steps", type=int, default=None,
              help="lori: steps of the dense phase that calibrates the mask (default: the same schedule).")
@click.option("--num-virtual-tokens", type=int, default=20, show_default=True, help="Prompt tuning / LLaMA-Adapter length.")
@click.option("--adapter-layers", type=int, default=8, show_default=True, help="LLaMA-Adapter: number of top layers.")
@click.option("--teacher-prompt", default=None,
              help="context_distillation: a text file with the prompt the adapter learns to do without.")
@click.option("--lr", type=float, default=2e-4, show_default=True, help="Peak learning rate.")
@click.option("--epochs", type=float, default=1.0, show_default=True, help="Epochs (ignored with --max-steps).")
@click.option("--max-steps", type=int, default=None, help="Stop after N optimizer steps.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Per-device batch size.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Gradient accumulation steps.")
@click.option("--max-length", type=int, default=512, show_default=True, help="Longest example in tokens.")
@click.option("--max-samples", type=int, default=None, help="Train on at most N rows (random subset).")
@click.option("--max-eval-samples", type=int, default=None,
              help="Evaluate on at most N rows. Default: a quarter of the rows trained on, 32 to 500.")
@click.option("--eval-before/--no-eval-before", default=False, show_default=True,
              help="Also evaluate before training (eval_loss_before).")
@click.option("--seed", type=int, default=42, show_default=True, help="Seed for shuffling and sampling.")
@click.option("--init-seed", type=int, default=None,
              help="Seed for the initial LoRA factors and head. Default: from --seed and the task name, so that "
                   "each task's adapter starts from different random factors (they merge with less interference).")
@click.option("--scheduler", default="linear", show_default=True, help="LR schedule: linear, cosine, constant, ...")
@click.option("--warmup-ratio", type=float, default=0.0, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--train-on-inputs", is_flag=True, help="Loss on the prompt too (default: completion only).")
@click.option("--packing", is_flag=True, help="Pack short examples into max-length sequences.")
@click.option("--eval-steps", type=int, default=None,
              help="Also evaluate (and checkpoint) every N steps during training. Default: no evaluation during "
                   "training unless --keep best or --early-stopping needs it.")
@click.option("--keep", type=click.Choice(["last", "best"]), default="last", show_default=True,
              help="Save the last step's weights, or the best checkpoint on validation (evaluates during training).")
@click.option("--early-stopping", type=int, default=None,
              help="Stop after N evaluations without improvement (keeps the best checkpoint).")
@click.option("--logging-steps", type=int, default=10, show_default=True)
@click.option("--gradient-checkpointing", is_flag=True, help="Trade compute for memory.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True)
@click.option("--resume", is_flag=True, help="Resume from the last checkpoint in --checkpoint-dir.")
@click.option("--checkpoint-dir", default=None, help="Checkpoints folder (default: .OUT.checkpoints beside OUT).")
@click.option("--keep-checkpoints", is_flag=True, help="Keep the checkpoints folder after success.")
@click.option("--training-args", "extra", default=None, help="Extra transformers TrainingArguments as JSON.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@push_to_hub_option
@common_options
def train(push_to_hub, **kw) -> None:
    """Train one task adapter on a base model (transformers' Trainer underneath).

    \b
    Evaluation: once after training, on up to a quarter as many validation
    rows as the run trains on (steps x batch; 32 to 500 rows; divided by
    1 + the number of labels when labels are scored as words), so that it
    costs under a tenth of the run. --eval-before adds one before training,
    --eval-steps N one every N steps. The last step's weights are kept;
    --keep best (or --early-stopping) evaluates 5 times during the run (or
    each epoch) and keeps the best checkpoint on validation accuracy (loss
    for text2text). The output says which weights were kept and why.
    """
    from ..train import TrainConfig, train as train_fn
    from ..train.distributed import is_main_process

    if kw["labels"]:
        kw["labels"] = [x.strip() for x in kw["labels"].split(",") if x.strip()]
    if kw["extra"] is None:
        kw["extra"] = {}
    kw["task"] = kw["task"] or ""
    result = train_fn(TrainConfig(**kw), progress=show_progress())
    if is_main_process():  # under torchrun / accelerate launch: one report, one push
        _echo_result(result)
        maybe_push(result.out, push_to_hub)


@click.command("train-many", cls=Command, log_level=logging.INFO)
@click.argument("tasks_yaml", type=click.Path(dir_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace existing output folders.")
@common_options
def train_many(tasks_yaml: str, overwrite: bool) -> None:
    """Train one adapter per task listed in TASKS_YAML (defaults, output_dir, tasks)."""
    from ..train import train_many as train_many_fn
    from ..train.distributed import is_main_process

    for r in train_many_fn(tasks_yaml, overwrite=overwrite, progress=show_progress()):
        if is_main_process():
            _echo_result(r)
