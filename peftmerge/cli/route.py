"""``peftmerge route build|eval``: build a router over adapters; measure its routing accuracy
(thin layers over :func:`peftmerge.routing.api.route_build` and :func:`~peftmerge.routing.api.route_eval`)."""

from __future__ import annotations

import json

import click

from ..errors import PeftmergeError
from . import params
from .common import SubGroup, common_options, debug_option, is_quiet, show_progress


def parse_pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    """``("task=file.jsonl", ...)`` -> {task: file}; a clear error naming the option otherwise."""
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise PeftmergeError(f"{option} {v!r} is not NAME=FILE.jsonl (e.g. {option} sst2=sst2_test.jsonl)")
        if name in out:
            raise PeftmergeError(f"{option} names task {name!r} twice; give each task once")
        out[name] = path
    return out


@click.group("route", cls=SubGroup)
@debug_option
def route_command():
    """Route queries to task adapters: build a router, evaluate it (see also `peftmerge predict`)."""


@route_command.command("build", cls=params.RouterCommand)
@click.argument("adapters", nargs=-1, metavar="ADAPTER...")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output router folder.")
@click.option("--strategy", default="centroid", show_default=True, help="Router: arrow, centroid or probe.")
@click.option("--examples", multiple=True, metavar="NAME=FILE.jsonl", help="Example inputs of adapter NAME.")
@click.option("--max-examples", type=int, default=1000, show_default=True,
              help="Example inputs used per adapter (stored samples first, then --examples).")
@click.option("--general", multiple=True, type=click.Path(), help="Arrow GenKnowSub: a general adapter (repeat).")
@click.option("--embedder", type=click.Path(), default=None, help="Sentence-embedding model folder (default: base).")
@click.option("--model", default=None, help="Base model path (default: the adapters' base model).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@common_options
def build_command(adapters, out, strategy, examples, max_examples, general, embedder, model, overwrite,
                  **router_params):
    """Build a router over ADAPTER... (PEFT LoRA adapter folders) into OUT.

    The routers' parameters (--top-k, --temperature, ...) are listed below; each applies to the routers named
    in its help."""
    from ..routing.api import route_build

    router = route_build(list(adapters), out, strategy, examples=parse_pairs(examples, "--examples"),
                         general=list(general), embedder=embedder, model=model, params=params.given(router_params),
                         max_examples=max_examples, overwrite=overwrite)
    if not is_quiet():
        click.echo(f"{strategy} router over {len(router.adapters)} adapters ({', '.join(router.tasks)}) "
                   f"written to {out}; params {json.dumps(router.params)}")


@route_command.command("eval")
@click.option("--router", "router", required=True, type=click.Path(), help="Router folder.")
@click.option("--data", multiple=True, required=True, metavar="TASK=FILE.jsonl",
              help="Queries whose correct adapter is TASK's (repeat per task).")
@click.option("--model", default=None, help="Base model path (default: the router's).")
@click.option("--limit", type=int, default=None, help="At most this many queries per task.")
@click.option("-o", "--out", type=click.Path(), default=None, help="Also write the report as JSON here.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@common_options
def eval_command(router, data, model, limit, out, overwrite):
    """Routing accuracy: the share of each task's queries routed (top-1) to that task's adapter."""
    from ..routing.api import route_eval

    report = route_eval(router, parse_pairs(data, "--data"), model=model, limit=limit, out=out, overwrite=overwrite,
                        progress=show_progress())
    for task, r in report["tasks"].items():
        click.echo(f"{task}: {r['accuracy']:.4f} ({r['n']} queries, {r['abstained']} abstained)")
    click.echo(f"overall: {report['accuracy']:.4f}")
