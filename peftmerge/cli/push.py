"""``peftmerge push``: upload an output folder to the Hub (a thin layer over :func:`peftmerge.hub.push.push`).

Also what other commands reuse to push at the end: the ``--push-to-hub USER/NAME`` option
(:func:`push_to_hub_option`) and :func:`maybe_push`.
"""

from __future__ import annotations

import logging

import click

from .common import Command, common_options, is_quiet


def _check_repo_id(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    # Checked when the command line is parsed, so a typo fails before a long merge or training run.
    from ..io.hub import looks_like_repo_id

    if value is not None and (not looks_like_repo_id(value) or "@" in value):
        raise click.BadParameter(f"{value!r} is not a Hub repo id; use user/name", ctx=ctx, param=param)
    return value


def push_to_hub_option(f):
    """``--push-to-hub USER/NAME`` (passed to the command as ``push_to_hub``); call :func:`maybe_push` at the end."""
    return click.option(
        "--push-to-hub", "push_to_hub", metavar="USER/NAME", default=None, callback=_check_repo_id,
        help="When OUT is written, upload it to this Hub repo (token from HF_TOKEN or `hf auth login`).",
    )(f)


def maybe_push(folder, repo_id: str | None, **kwargs) -> str | None:
    """Push ``folder`` to ``repo_id`` if one was given (``--push-to-hub``); echo and return the URL.

    ``kwargs`` go to :func:`peftmerge.hub.push.push` (private, revision, commit_message, token). A failure
    raises a one-line :class:`~peftmerge.errors.PeftmergeError` and leaves ``folder`` in place.
    """
    if not repo_id:
        return None
    from ..hub.push import push

    url = push(folder, repo_id, **kwargs)
    click.echo(f"pushed {folder} to {url}")
    return url


@click.command("push", cls=Command, load_torch=False, bars=True, log_level=logging.INFO)
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--repo-id", required=True, callback=_check_repo_id, metavar="USER/NAME", help="Hub repo to push to.")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", default=None, metavar="BRANCH", help="Branch to push to (created if missing; default main).")
@click.option("--commit-message", default=None, help="Commit message (default: Upload <kind> with peftmerge <version>).")
@click.option("--dry-run", is_flag=True, help="Print the files that would be uploaded and the card; upload nothing "
              "(no token needed).")
@common_options
def push_command(folder, repo_id, private, revision, commit_message, dry_run):
    """Upload FOLDER (an adapter, merged adapter, merged model or router) to the Hub repo USER/NAME.

    Only the files peftmerge writes are uploaded (weights, configs, tokenizer files, the card, peftmerge.json,
    merge_report.json, heads/, plots; never a symlink out of FOLDER), and no absolute local path goes into
    them. A model card (README.md) is generated if FOLDER has none; FOLDER itself is not modified.
    The token comes from HF_TOKEN or `hf auth login`.
    """
    from ..hub.push import plan_push, push

    if dry_run:
        plan = plan_push(folder, repo_id, revision=revision)
        if not is_quiet():
            click.echo(f"would upload {len(plan.files)} files of {folder} to {repo_id}"
                       f"{f' (branch {revision})' if revision else ''}:")
        for path, size in plan.files:
            click.echo(f"  {path} ({size:,} bytes)")
        if plan.skipped and not is_quiet():
            click.echo(f"not uploaded: {', '.join(plan.skipped)}")
        if not is_quiet():
            click.echo("--- README.md ---")
            click.echo(plan.card.rstrip("\n"))
        return
    click.echo(push(folder, repo_id, private=private, revision=revision, commit_message=commit_message))
