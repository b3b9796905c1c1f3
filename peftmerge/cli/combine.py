"""``peftmerge combine``: merge LoRA adapters (a thin layer over :func:`peftmerge.merge.combine.combine`)."""

from __future__ import annotations

import json

import click

from . import params
from .common import common_options, is_quiet, parse_floats, show_progress
from .push import maybe_push, push_to_hub_option


class CombineCommand(params.MethodCommand):
    """``combine --help`` ends with every method and its defaults (read from the registry when asked)."""

    def format_epilog(self, ctx, formatter):
        from ..merge.registry import methods

        with formatter.section("Methods (defaults; see `peftmerge methods -v`)"):
            formatter.write_dl([(m.name, ", ".join(f"{p.name}={p.default}" for p in m.params) or "weights only")
                                for m in methods()])


def error_hint(report: dict) -> str:
    """What the merge report's relative error means, and what to do when it is large."""
    mean = report["relative_error_mean"]
    text = f"relative error mean {mean:.2e}, max {report['relative_error_max']:.2e}"
    if mean > 0.05:
        rank = f"rank-{report['rank']}" if report.get("rank") else "default-rank (sum of the input ranks)"
        text += (f": the {rank} adapter is {mean:.0%} off the full-space merge on average (Frobenius norm; trimmed "
                 "and sign-elected merges are not low rank), which kept the merge's accuracy in docs/spaces.md; "
                 "--rank N keeps more of it, --base writes it exactly, --space core writes a Core Space merge exactly")
    return text


@click.command("combine", cls=CombineCommand)
@click.argument("inputs", nargs=-1, metavar="INPUT...")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output folder (a PEFT adapter).")
@click.option("--method", default=None, help="Merge method (default: ties); defaults listed below.")
@click.option("--weights", default=None, help="Per-input weights, comma-separated (default: 1 each).")
@click.option("--grams", type=click.Path(), default=None,
              help="Data-aware methods (regmean): the inputs' Gram matrices, written by `peftmerge grams`.")
@click.option("--rank", type=int, default=None, help="Output rank (default: sum of the input ranks).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Output dtype (computation is float32).")
@click.option("--serve-rank", default=None, metavar="vllm|R",
              help="Write every module at one rank a serving engine loads: 'vllm' (the smallest of vLLM's "
                   "--max-lora-rank sizes holding the largest rank) or R; zero-padded (exact) or truncated "
                   "optimally (error reported). See docs/serving.md.")
@click.option("--alpha", type=float, default=None,
              help="lora_alpha of inputs that have no adapter_config.json (others keep their own).")
@click.option("--config", type=click.Path(), default=None, help="A YAML recipe in mergekit's format, merged as mergekit defines it (see docs/merging.md).")
@click.option("--base", default=None, help="Base model folder: write a full merged model (inputs may be "
              "LoRA adapters or full fine-tuned checkpoints of it).")
@click.option("--shard-size", default=None, help="Full models: largest shard file (default 5GB; e.g. 500MB).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--force", is_flag=True, help="Merge adapters of different base models / with no module in common.")
@push_to_hub_option
@common_options
def combine_command(inputs, out, method, weights, grams, rank, dtype, serve_rank, alpha, config, base, shard_size,
                    overwrite, force, push_to_hub, **method_params):
    """Merge LoRA adapters INPUT... (folders, .safetensors files or Hub ids) into one adapter in OUT.

    With --base BASE, write a full merged model instead; INPUT... may then also be full fine-tuned
    checkpoints of BASE. The methods' parameters (--density, --lambda, ...) are listed below and by
    `peftmerge methods`."""
    from ..merge.combine import combine
    from ..merge.serve import describe

    quiet = is_quiet()
    report = combine(list(inputs), out, method, weights=parse_floats(weights, "--weights"),
                     params=params.given(method_params), grams=grams, rank=rank, dtype=dtype, serve_rank=serve_rank,
                     alpha=alpha,
                     config=config, base=base, shard_size=shard_size, overwrite=overwrite, force=force,
                     progress=show_progress())
    if quiet:
        pass
    elif report.get("kind") == "merged-model":
        click.echo(f"{report['method']}: merged {len(report['inputs'])} inputs onto {report['base_model']} "
                   f"({report['tensors_merged']} tensors merged, {report['tensors_copied']} copied, "
                   f"{report['bytes_written'] / 1e6:.1f} MB in {len(report['shards'])} shard(s)) into {out} "
                   f"in {report['seconds']:.1f} s")
    else:
        click.echo(f"{report['method']}: merged {len(report['inputs'])} adapters over {report['modules']} modules "
                   f"into {out} ({error_hint(report)}; params {json.dumps(report['params'])})"
                   + (f"; {describe(report['serve'])}" if "serve" in report else ""))
    maybe_push(out, push_to_hub)
