"""Write an output folder atomically: into a temporary folder beside OUT, renamed at the end.

An error, Ctrl-C or SIGTERM leaves no partial OUT behind, and an existing OUT is only replaced
(with ``overwrite=True``) once the new one is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import PeftmergeError


def check_output(out: str | Path, inputs: list[Path] = (), overwrite: bool = False) -> Path:
    """Refuse an OUT that is one of the inputs, or that exists without ``overwrite``."""
    out = Path(out)
    resolved = out.resolve()
    for p in inputs:
        p = Path(p).resolve()
        if resolved == p or resolved in p.parents:
            raise PeftmergeError(f"output {out} is an input ({p}); choose another output folder")
    if out.exists() and not overwrite:
        raise PeftmergeError(f"output {out} already exists; pass --overwrite to replace it or choose another path")
    return out


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes ``out``; on any failure it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old_handler = None
    try:
        old_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        pass
    try:
        yield tmp
        if out.exists():
            if not overwrite:
                raise PeftmergeError(f"output {out} already exists; pass --overwrite to replace it")
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)


@contextlib.contextmanager
def atomic_file(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside ``out``; on success it is renamed to ``out``, on failure removed."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise PeftmergeError(f"output {out} already exists; pass --overwrite to replace it or choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
