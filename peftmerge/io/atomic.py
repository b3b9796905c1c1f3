"""Outputs that never lose, corrupt or half-write anything.

:func:`check_output` runs before any work: an output may not be, contain or lie inside an input (after
resolving symlinks), an existing output is only replaced with ``overwrite`` (and only when it is a
peftmerge output), and the location is probed (a folder that cannot be written, a name too long) so
that an error comes before a long merge, not after it.

:func:`atomic_dir` / :func:`atomic_file` / :func:`atomic_files` write into temporary names beside the
output, renamed at the end. An error, Ctrl-C or SIGTERM removes them; a process killed outright leaves
them, named ``.<OUT>.tmp-<pid>-*`` (``.<OUT>.old-<pid>-*`` for a replaced output being swapped), and the
next run of the same output removes those whose process is gone (putting a swapped-out output back).
Files and folders get the modes the umask gives (as ``touch``/``mkdir`` would), not the private ones of
``mkstemp``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import PeftmergeError

# What peftmerge writes at the top of an output folder: a folder holding one of these (or nothing) is an
# output that --overwrite may replace.
OUTPUT_MARKERS = ("peftmerge.json", "merge_report.json", "router.json", "search.json", "inspect.json",
                  "report.json")
_ALWAYS_DISK = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_DISK_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG}
_DISK_TEXT = {"No space left on device": errno.ENOSPC, "File too large": errno.EFBIG,
              "Disk quota exceeded": errno.EDQUOT, "Read-only file system": errno.EROFS,
              "os error 28": errno.ENOSPC, "os error 27": errno.EFBIG, "os error 122": errno.EDQUOT,
              "os error 30": errno.EROFS}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _stem(out: Path) -> str:
    """The hidden name our temporary files for ``out`` start with (long names shortened, with a hash)."""
    name = out.name
    if len(name.encode()) > 120:
        name = name[:48].encode()[:48].decode(errors="ignore") + "-" + hashlib.sha1(name.encode()).hexdigest()[:12]
    return f".{name}"


def temp_prefix(out: str | Path) -> str:
    """``.<OUT>.tmp-``: the prefix of the temporary folders and files written for ``out``."""
    return f"{_stem(Path(out))}.tmp-"


def _trash_prefix(out: Path) -> str:
    return f"{_stem(out)}.old-"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child not yet waited for is a zombie: gone for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def clean_stale(out: str | Path) -> list[Path]:
    """Remove the temporary folders and files a killed run of ``out`` left behind (ours by name, their
    process gone); a swapped-out output whose replacement never arrived is put back. Returns what was removed."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        return []
    tmp, trash = temp_prefix(out), _trash_prefix(out)
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    for p in entries:
        prefix = tmp if p.name.startswith(tmp) else trash if p.name.startswith(trash) else None
        if prefix is None:
            continue
        pid = p.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if prefix == trash and (p / out.name).exists() and not os.path.lexists(out):
            with contextlib.suppress(OSError):
                os.replace(p / out.name, out)  # the old output, swapped out by a run killed before the swap-in
        _remove(p)
        removed.append(p)
    return removed


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _resolve(p: Path) -> Path:
    try:
        return p.resolve()
    except (RuntimeError, OSError):  # a symlink loop
        raise PeftmergeError(f"{p}: a loop of symbolic links; fix the link") from None


def check_overlap(out: str | Path, inputs) -> None:
    """Refuse an output that is, contains or lies inside an input (both as written and with symlinks
    resolved): writing it would replace or change that input."""
    out = Path(out)
    outs = {Path(os.path.abspath(out)), _resolve(out)}
    for p in inputs:
        if p is None or not os.path.lexists(p):  # a Hub id or a missing path: nothing on disk to protect
            continue
        p = Path(p)
        for q in {Path(os.path.abspath(p)), _resolve(p)}:
            for o in outs:
                if o == q:
                    raise PeftmergeError(f"output {out} is an input ({p}); write the output elsewhere")
                if _inside(q, o):
                    raise PeftmergeError(f"output {out} contains an input ({p}); writing it would replace that "
                                         "input: choose another output")
                if _inside(o, q):
                    raise PeftmergeError(f"output {out} lies inside an input ({p}); write the output elsewhere "
                                         "(inputs are never modified)")


def _replaceable(out: Path, folder: bool) -> None:
    """With ``overwrite``: refuse to replace what peftmerge did not write (the working folder, home, a folder
    that is not an output)."""
    resolved = _resolve(out)
    for special, what in ((Path.cwd().resolve(), "the working folder"), (Path.home().resolve(), "your home folder")):
        if _inside(special, resolved):
            raise PeftmergeError(f"output {out} is or holds {what}; --overwrite only replaces an earlier output: "
                                 "choose another output")
    if folder and not out.is_dir():
        raise PeftmergeError(f"output {out} is a file; peftmerge writes a folder there: choose another output")
    if out.is_dir():
        if not folder:
            raise PeftmergeError(f"output {out} is a folder; give a file name")
        try:
            names = {p.name for p in out.iterdir()}
        except OSError:
            names = set()
        if names and not names & set(OUTPUT_MARKERS):
            raise PeftmergeError(f"output {out} is a folder peftmerge did not write (none of "
                                 f"{', '.join(OUTPUT_MARKERS[:3])}, ... in it); --overwrite only replaces an earlier "
                                 "output: choose another output")


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _check_names(out: Path) -> None:
    """Every part of ``out``'s path fits the file system's name length."""
    limit = _name_max(Path("/"))
    for part in Path(os.path.abspath(out)).parts:
        if len(part.encode()) > limit:
            raise PeftmergeError(f"cannot write output {out}: the name {part[:40]}... is {len(part.encode())} bytes, "
                                 f"more than the file system's {limit}; use a shorter name")


def probe_location(out: str | Path) -> None:
    """Check now that ``out`` can be written: names fit the file system, every missing folder on its path can be
    made and the nearest existing one accepts a new entry."""
    _check_names(Path(out))
    out = Path(os.path.abspath(out))
    existing = out.parent
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        raise PeftmergeError(f"cannot write output {out}: {existing} is a file, not a folder; choose another output")
    try:
        probe = tempfile.mkdtemp(prefix=f"{temp_prefix(out)}{os.getpid()}-probe-", dir=existing)
        os.rmdir(probe)
    except OSError as e:
        raise PeftmergeError(f"cannot write output {out}: {e.strerror or e} in {existing}; choose another output") \
            from None


def check_output(out: str | Path, inputs=(), overwrite: bool = False, *, folder: bool = True) -> Path:
    """Everything that can be known before the work: ``out`` does not touch an input, exists only with
    ``overwrite`` (and is then an earlier output), is not a symlink, and its location can be written.
    Also removes what a killed earlier run of ``out`` left behind. ``folder``: the output is a folder (else a file).
    """
    if out is None or str(out).strip() == "":
        raise PeftmergeError("no output given; pass -o OUT")
    out = Path(out)
    _check_names(out)
    if out.is_symlink():
        raise PeftmergeError(f"output {out} is a symbolic link (to {os.readlink(out)}); peftmerge does not write "
                             "through links: give the real path or another name")
    check_overlap(out, inputs)
    if out.exists():
        if not overwrite:
            raise PeftmergeError(f"output {out} already exists; pass --overwrite to replace it or choose another path")
        _replaceable(out, folder)
    clean_stale(out)
    probe_location(out)
    return out


def as_disk_error(e: BaseException, out) -> PeftmergeError | None:
    """A one-line error for a failed write of ``out`` (disk full, file too large, read-only...) anywhere in
    ``e``'s chain (an OSError, or a library's error carrying the OS message); None for anything else.
    Permission and name errors count only for paths beside ``out`` (not for an input that cannot be read)."""
    where = os.path.abspath(Path(out).parent)
    for _ in range(10):
        if e is None or isinstance(e, PeftmergeError):
            return None
        code = e.errno if isinstance(e, OSError) else None
        if code is None:
            code = next((c for text, c in _DISK_TEXT.items() if text in str(e)), None)
        if code in _ALWAYS_DISK or (code in _DISK_ERRNOS and isinstance(e, OSError) and any(
                f is not None and os.path.abspath(f).startswith(where) for f in (e.filename, e.filename2))):
            hint = {errno.ENOSPC: "the disk is full: free some space", errno.EFBIG: "a file grew past the size "
                    "limit (ulimit -f)", errno.EDQUOT: "the disk quota is reached"}.get(code, os.strerror(code))
            return PeftmergeError(f"writing {out} failed: {hint}; nothing was written, the inputs are unchanged; "
                                  "fix it or write elsewhere, then run again")
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return None


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _sigterm_as_interrupt():
    try:
        old = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p ``folder``; returns the folders made (deepest last) so a failure can take them back."""
    made = []
    for p in reversed([folder, *folder.parents]):
        if not os.path.lexists(p):
            p.mkdir()
            made.append(p)
    return made


def _unmake(made: list[Path]) -> None:
    for p in reversed(made):
        with contextlib.suppress(OSError):
            p.rmdir()  # only if still empty


def _follow_umask(root: Path) -> None:
    """Give ``root`` (and what it holds) the modes a plain mkdir / open would: 0777 / 0666 minus the umask."""
    mask = _umask()
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for p in paths:
        if p.is_symlink():
            continue
        with contextlib.suppress(OSError):
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _failed(e: BaseException, out: Path) -> None:
    """Re-raise a write failure as one line when it is the disk's doing."""
    explained = as_disk_error(e, out)
    if explained is not None:
        raise explained from e


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes ``out``; on any failure it is removed (and so are the
    parent folders made for it)."""
    out = Path(out)
    made = []
    tmp = None
    try:
        made = _make_parents(out.parent if str(out.parent) else Path("."))
        tmp = Path(tempfile.mkdtemp(prefix=f"{temp_prefix(out)}{os.getpid()}-", dir=out.parent))
        with _sigterm_as_interrupt():
            yield tmp
            _follow_umask(tmp)
            _swap_in(tmp, out, overwrite)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _unmake(made)
        _failed(e, out)
        raise


def _swap_in(tmp: Path, out: Path, overwrite: bool) -> None:
    if os.path.lexists(out):
        if not overwrite:  # it did not exist when this run started
            raise PeftmergeError(f"output {out} was written by another run meanwhile; its output is kept, this one is "
                                 "dropped")
        trash = Path(tempfile.mkdtemp(prefix=f"{_trash_prefix(out)}{os.getpid()}-", dir=out.parent))
        os.replace(out, trash / out.name)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(trash / out.name, out)
            shutil.rmtree(trash, ignore_errors=True)
            raise
        shutil.rmtree(trash, ignore_errors=True)
        return
    try:
        os.rename(tmp, out)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise PeftmergeError(f"output {out} was written by another run meanwhile; its output is kept, this "
                                 "one is dropped") from None
        raise


def _link_new(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out`` only if ``out`` still does not exist (another writer may have made it)."""
    try:
        os.link(tmp, out)  # atomic: fails if ``out`` exists
    except FileExistsError:
        raise PeftmergeError(f"output {out} was written by another run meanwhile; its output is kept, this one is "
                             "dropped") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(out):  # no hard links on this file system: check, then rename
            raise PeftmergeError(f"output {out} was written by another run meanwhile; its output is kept, this one "
                                 "is dropped") from None
        os.replace(tmp, out)
        return
    os.unlink(tmp)


@contextlib.contextmanager
def atomic_file(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside ``out``; on success it is renamed to ``out``, on failure removed."""
    with atomic_files([out], overwrite) as tmps:
        yield tmps[Path(out)]


@contextlib.contextmanager
def atomic_files(outs, overwrite: bool = False) -> Iterator[dict[Path, Path]]:
    """Yield ``{out: temporary path}`` for several files written together; all are renamed at the end, or none."""
    outs = [Path(o) for o in outs]
    for out in outs:
        if os.path.lexists(out) and not overwrite:
            raise PeftmergeError(f"output {out} already exists; pass --overwrite to replace it or choose another path")
    made: list[Path] = []
    tmps: dict[Path, Path] = {}
    try:
        for out in outs:
            made += _make_parents(out.parent if str(out.parent) else Path("."))
            fd, tmp = tempfile.mkstemp(prefix=f"{temp_prefix(out)}{os.getpid()}-", suffix=out.suffix, dir=out.parent)
            os.close(fd)
            tmps[out] = Path(tmp)
        with _sigterm_as_interrupt():
            yield tmps
            for out, tmp in tmps.items():
                _follow_umask(tmp)
            for out, tmp in tmps.items():
                if overwrite:
                    os.replace(tmp, out)
                else:
                    _link_new(tmp, out)
    except BaseException as e:
        for tmp in tmps.values():
            with contextlib.suppress(OSError):
                tmp.unlink()
        _unmake(made)
        _failed(e, outs[0])
        raise
