"""What every command shares: ``--quiet``, ``--debug`` and ``--threads``, quiet libraries, and user errors
printed as one line with exit code 2.

Every command is a :class:`Command` (groups: :class:`Group`). Before its body runs, :func:`runtime` sets
the thread count (:func:`peftmerge.threads.set_threads`) and keeps the libraries underneath quiet:
transformers' and peft's warnings, load reports and progress bars are shown with ``--debug`` only;
``--quiet`` also silences peftmerge's own progress bars and log lines, leaving the result.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import warnings

import click

from ..errors import PeftmergeError

DEBUG_KEY = "peftmerge.debug"
QUIET_KEY = "peftmerge.quiet"
THREADS_KEY = "peftmerge.threads"

# Loggers of the libraries underneath: their warnings are for us, not for our users (shown with --debug).
_LIBRARY_LOGGERS = ("transformers", "peft", "accelerate", "huggingface_hub", "datasets", "bitsandbytes", "kernels",
                    "torch", "safetensors", "numba", "matplotlib", "urllib3", "httpx", "filelock")
# bitsandbytes warns through Python's last-resort handler when peft imports it, which may happen while a command's
# options are built (from a registry), before runtime() quiets it: a handler that drops those records.
for _name in ("bitsandbytes", "kernels"):
    logging.getLogger(_name).addHandler(logging.NullHandler())


def _set_meta(key):
    def callback(ctx: click.Context, _param: click.Parameter, value):
        if value:
            ctx.meta[key] = value
        return value

    return callback


def debug_option(f):
    """``--debug``: full tracebacks, and the libraries' warnings and progress bars."""
    return click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_meta(DEBUG_KEY),
                        help="Show full tracebacks and the libraries' warnings.")(f)


def quiet_option(f):
    """``--quiet``: print the result only (no progress bars, no log lines); read it with :func:`is_quiet`."""
    return click.option("--quiet", is_flag=True, expose_value=False, callback=_set_meta(QUIET_KEY),
                        help="Print the result only: no progress bars, no log lines.")(f)


def threads_option(f):
    """``--threads N``: CPU threads of torch, numba and OpenMP (default: cores left idle by the load average)."""
    return click.option("--threads", type=click.IntRange(min=1), default=None, expose_value=False,
                        callback=_set_meta(THREADS_KEY), metavar="N",
                        help="CPU threads (default: OMP_NUM_THREADS, else the cores minus the load average, >= 1).")(f)


def common_options(f):
    """``--quiet``, ``--threads`` and ``--debug``: every command takes them."""
    return debug_option(threads_option(quiet_option(f)))


def is_quiet() -> bool:
    """Whether the running command was given ``--quiet``."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.meta.get(QUIET_KEY))


def show_progress() -> bool:
    """Progress bars: on a terminal, unless ``--quiet`` (a log file or a pipe gets the result and errors only)."""
    return not is_quiet() and sys.stderr.isatty()


def is_debug() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.meta.get(DEBUG_KEY))


@contextlib.contextmanager
def _env(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def runtime(ctx: click.Context, log_level: int = logging.WARNING, load_torch: bool = True, bars: bool = False):
    """Threads, logging, warnings and progress bars for one command, restored when it ends.

    ``log_level``: peftmerge's own log lines shown in a normal run (``--quiet``: errors only).
    ``bars``: keep huggingface_hub's progress bars in a normal run on a terminal (push: the upload).
    """
    from ..threads import set_threads

    debug, quiet = bool(ctx.meta.get(DEBUG_KEY)), bool(ctx.meta.get(QUIET_KEY))
    env = {} if debug else {"TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
                            "DATASETS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
                            "HF_HUB_DISABLE_PROGRESS_BARS": None if bars and not quiet and sys.stderr.isatty() else "1"}
    ours = logging.getLogger("peftmerge")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved_levels = {name: logging.getLogger(name).level for name in (*_LIBRARY_LOGGERS, "peftmerge")}
    saved_propagate = ours.propagate
    threads_before = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
    thread_env = dict.fromkeys(("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"))
    with _env(**env, **thread_env), warnings.catch_warnings():
        if not debug:
            warnings.simplefilter("ignore")  # the libraries' Deprecation/Future/UserWarnings
            for name in _LIBRARY_LOGGERS:
                logging.getLogger(name).setLevel(logging.ERROR)
        _quiet_transformers(debug)
        ours.setLevel(logging.DEBUG if debug else logging.ERROR if quiet else log_level)
        ours.addHandler(handler)
        ours.propagate = False
        try:
            if load_torch:
                import torch  # noqa: F401  (so that its inter-op pool is sized before first use)
            set_threads(ctx.meta.get(THREADS_KEY))
            yield
        finally:
            if threads_before is not None:  # a caller in the same process gets its thread count back
                sys.modules["torch"].set_num_threads(threads_before)
            ours.removeHandler(handler)
            ours.propagate = saved_propagate
            for name, level in saved_levels.items():
                logging.getLogger(name).setLevel(level)


def _quiet_transformers(debug: bool) -> None:
    """transformers reads its verbosity from the environment when it loads; when it is loaded already, set it."""
    if "transformers" not in sys.modules:
        return
    from transformers.utils import logging as tlog

    tlog.set_verbosity(tlog.WARNING if debug else tlog.ERROR)
    if debug:
        tlog.enable_progress_bar()
    else:
        tlog.disable_progress_bar()


class Command(click.Command):
    """A peftmerge command: :func:`common_options`, and :func:`runtime` around its body.

    ``log_level`` is the level of peftmerge's own log lines in a normal run; ``load_torch=False`` for commands
    that never need torch (push); ``bars`` keeps the Hub's upload progress bars.
    """

    def __init__(self, *args, log_level: int = logging.WARNING, load_torch: bool = True, bars: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.log_level, self.load_torch, self.bars = log_level, load_torch, bars

    def invoke(self, ctx: click.Context):
        with runtime(ctx, self.log_level, self.load_torch, self.bars):
            return super().invoke(ctx)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split("\n")).strip()


def os_error_message(e: OSError) -> str:
    """One line for an OS error (disk full, read-only, name too long...), naming the file."""
    where = f"{e.filename}: " if e.filename else ""
    what = e.strerror or _one_line(e) or type(e).__name__
    hint = {errno.ENOSPC: "free some space or write elsewhere",
            errno.EFBIG: "the file size limit was reached (ulimit -f); raise it or write elsewhere",
            errno.EDQUOT: "the disk quota is reached; free some space or write elsewhere",
            errno.EROFS: "the file system is read-only; write elsewhere",
            errno.EACCES: "no permission; write elsewhere or fix the permissions",
            errno.EPERM: "not permitted; write elsewhere or fix the permissions",
            errno.ENAMETOOLONG: "use a shorter name",
            errno.ENOENT: "check the path"}.get(e.errno, "check the path and the disk")
    return f"{where}{what}; {hint}"


class Group(click.Group):
    """A click group that prints :class:`PeftmergeError`, usage and OS errors as one line, exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PeftmergeError as e:
            if ctx.meta.get(DEBUG_KEY):
                raise
            click.echo(f"Error: {_one_line(e)}", err=True)
            ctx.exit(2)
        except click.UsageError as e:
            if ctx.meta.get(DEBUG_KEY):
                raise
            where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            click.echo(f"Error: {_one_line(e.format_message())}{where}", err=True)
            ctx.exit(2)
        except OSError as e:
            if ctx.meta.get(DEBUG_KEY):
                raise
            click.echo(f"Error: {os_error_message(e)}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            if ctx.meta.get(DEBUG_KEY):
                raise
            click.echo("Interrupted: nothing was written.", err=True)
            ctx.exit(130)


class SubGroup(click.Group):
    """A nested group (``route``, ``eval``): its commands are :class:`Command` s."""

    command_class = Command


def parse_floats(value: str | None, name: str) -> list[float] | None:
    """``"0.5,0.3"`` -> ``[0.5, 0.3]``; a clear error naming the option otherwise (NaN and infinity refused)."""
    import math

    if value is None:
        return None
    try:
        values = [float(v) for v in value.split(",") if v.strip() != ""]
    except ValueError:
        raise PeftmergeError(f"{name} {value!r} is not a comma-separated list of numbers (e.g. 0.5,0.3,0.2)") from None
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise PeftmergeError(f"{name} {value!r} holds {bad[0]}; give finite numbers (e.g. 0.5,0.3,0.2)")
    return values
