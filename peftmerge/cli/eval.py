"""``peftmerge eval`` (evaluate on task data) and ``peftmerge eval report`` (combine results files).

Thin layers over :func:`peftmerge.evaluate.evaluate` and :func:`peftmerge.evaluate.report`.
"""

from __future__ import annotations

import click

from ..errors import PeftmergeError
from .common import SubGroup, common_options, is_quiet, runtime, show_progress


@click.group("eval", cls=SubGroup, invoke_without_command=True)
@click.option("--model", "model", default=None, help="Base model: folder, .gguf file, Hub id, or a full merged model.")
@click.option("--adapter", type=click.Path(), default=None, help="A LoRA adapter or merged adapter folder.")
@click.option("--router", type=click.Path(), default=None, help="A router folder (needs peftmerge.routing).")
@click.option("--data", multiple=True, metavar="NAME=FILE", help="Task data (JSONL), repeatable.")
@click.option("--reference", multiple=True, metavar="NAME=DIR",
              help="Each task's own adapter: adds the 'individual' row and normalized accuracy.")
@click.option("--reference-results", type=click.Path(), default=None,
              help="Reuse the 'individual' row of an earlier results.json instead of --reference.")
@click.option("--train", multiple=True, metavar="NAME=FILE", help="Train split of a task, for --icl-shots.")
@click.option("--icl-shots", type=int, default=0, help="Add a base-model row with K in-context examples.")
@click.option("--zero-shot", is_flag=True, help="Add the base model zero-shot row.")
@click.option("--name", default=None, help="Name of the evaluated system in the table (default: the method).")
@click.option("--limit", type=int, default=None, help="Evaluate the first N rows of each file (quick runs).")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--max-length", type=int, default=256, show_default=True, help="Tokens per input.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True, help="Generation budget (free text).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--out", type=click.Path(), default=None,
              help="results.json to write (with .md table and .png bars beside it).")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@common_options
@click.pass_context
def eval_command(ctx, model, adapter, router, data, reference, reference_results, train, icl_shots, zero_shot,
                 name, limit, batch_size, max_length, max_new_tokens, seed, out, overwrite):
    """Evaluate a base model, adapter, merged adapter/model or router on task data.

    \b
    peftmerge eval --model BASE --adapter merged/ --data sst2=sst2/test.jsonl \\
        --reference sst2=adapters/sst2 --zero-shot --icl-shots 4 --train sst2=sst2/train.jsonl -o results.json
    peftmerge eval report results/*.json -o report/
    """
    if ctx.invoked_subcommand is not None:
        return
    if model is None:  # before any heavy import: a missing option fails at once (evaluate() checks it too)
        raise PeftmergeError("--model is required: the base model folder, .gguf file or Hub id")
    with runtime(ctx):
        from ..evaluate import Settings, evaluate
        from ..evaluate.report import majority_of, markdown, systems_of

        settings = Settings(batch_size=batch_size, max_length=max_length, max_new_tokens=max_new_tokens,
                            limit=limit, seed=seed, progress=show_progress())
        results = evaluate(model, list(data), adapter=adapter, router=router, name=name, reference=list(reference),
                           train=list(train), icl_shots=icl_shots, zero_shot=zero_shot,
                           reference_results=reference_results, settings=settings, out=out,
                           overwrite=overwrite)
        click.echo(markdown(systems_of(results), majority_of(results)))


@eval_command.command("report")
@click.argument("files", nargs=-1, metavar="RESULTS.json...")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output folder (report.md + PNG plots).")
@click.option("--title", default="Results", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@common_options
def report_command(files, out, title, overwrite):
    """Combine results files: one table, per-task bars, normalized accuracy vs number of merged tasks."""
    from ..evaluate import report

    report(list(files), out, title=title, overwrite=overwrite)
    if not is_quiet():
        click.echo(f"wrote {out}/report.md, bars.png, normalized_vs_tasks.png")
