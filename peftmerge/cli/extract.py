"""``peftmerge extract``: a LoRA adapter from a full fine-tune (a thin layer over :func:`peftmerge.merge.extract.extract`)."""

from __future__ import annotations

import click

from .common import Command, common_options, is_quiet, show_progress
from .push import maybe_push, push_to_hub_option


@click.command("extract", cls=Command)
@click.argument("finetuned")
@click.option("--base", required=True, help="The base model FINETUNED was tuned from (a model folder or Hub id).")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output folder (a PEFT LoRA adapter).")
@click.option("--rank", type=int, default=None, help="Largest rank per module (the optimal rank-R approximation).")
@click.option("--energy", type=float, default=None,
              help="Per module, the smallest rank keeping this fraction of ||dW||^2 (e.g. 0.99); capped by --rank.")
@click.option("--modules", default=None, help="Modules to extract, comma-separated (names or suffixes, e.g. "
              "q_proj,v_proj; default: every changed Linear, Conv1D and Embedding weight).")
@click.option("--task", default=None, help="Task name stored in peftmerge.json (default: FINETUNED's folder name).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="dtype of the LoRA factors (computation is float32, the SVD float64).")
@click.option("--serve-rank", default=None, metavar="vllm|R",
              help="Write every module at one rank a serving engine loads: 'vllm' (the smallest of vLLM's "
                   "--max-lora-rank sizes holding the largest rank) or R; zero-padded (exact) or truncated "
                   "optimally (error reported). See docs/serving.md.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@push_to_hub_option
@common_options
def extract_command(finetuned, base, out, rank, energy, modules, task, dtype, serve_rank, overwrite, push_to_hub):
    """Extract a LoRA adapter from FINETUNED: per module, the best rank-R approximation of W_ft - W_base."""
    from ..merge.extract import REPORT, extract
    from ..merge.serve import describe

    report = extract(finetuned, base, out, rank=rank, energy=energy, modules=modules, dtype=dtype, task=task,
                     serve_rank=serve_rank, overwrite=overwrite, progress=show_progress())
    if not is_quiet():
        click.echo(f"extract: {report['modules']} modules into {out} (r {report['r']}; relative error mean "
                   f"{report['relative_error_mean']:.2e}, max {report['relative_error_max']:.2e}; "
                   f"{len(report['not_lora'])} changed tensors not in the adapter; per module: {REPORT}) "
                   f"in {report['seconds']:.1f} s" + (f"; {describe(report['serve'])}" if "serve" in report else ""))
    maybe_push(out, push_to_hub)
