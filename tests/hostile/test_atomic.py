"""The output checks and atomic writers every command uses (peftmerge.io.atomic), on their own."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from peftmerge.errors import PeftmergeError
from peftmerge.io.atomic import atomic_dir, atomic_file, check_output, clean_stale, temp_prefix


@pytest.fixture
def adapter(tmp_path):
    folder = tmp_path / "in" / "a"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    return folder


@pytest.mark.parametrize("form, message", [
    ("is", "is an input"), ("contains", "contains an input"), ("inside", "lies inside an input"),
    ("inside-through-a-link", "lies inside an input"), ("link-to-input", "symbolic link"),
    ("input-is-a-link-to-out", "contains an input"),
])
def test_an_output_never_touches_an_input(form, message, adapter, tmp_path):
    out = {"is": adapter, "contains": adapter.parent, "inside": adapter / "sub" / "out"}.get(form)
    inputs = [adapter]
    if form == "inside-through-a-link":
        (tmp_path / "link").symlink_to(adapter)
        out = tmp_path / "link" / "merged"
    elif form == "link-to-input":
        (tmp_path / "link").symlink_to(adapter)
        out = tmp_path / "link"
    elif form == "input-is-a-link-to-out":  # the input given as a link into the output's folder
        (tmp_path / "alias").symlink_to(adapter)
        inputs, out = [tmp_path / "alias"], adapter.parent
    for overwrite in (False, True):
        with pytest.raises(PeftmergeError, match=message):
            check_output(out, inputs, overwrite=overwrite)


def test_overwrite_replaces_only_an_earlier_output(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "photo.jpg").write_text("x")
    with pytest.raises(PeftmergeError, match="already exists; pass --overwrite"):
        check_output(mine)
    with pytest.raises(PeftmergeError, match="a folder peftmerge did not write"):
        check_output(mine, overwrite=True)
    (mine / "peftmerge.json").write_text("{}")
    assert check_output(mine, overwrite=True) == mine
    monkeypatch.chdir(mine)
    with pytest.raises(PeftmergeError, match="the working folder"):
        check_output(tmp_path, overwrite=True)


def test_the_location_is_probed_before_the_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(PeftmergeError, match="is a file, not a folder"):
        check_output(tmp_path / "file" / "out")
    with pytest.raises(PeftmergeError, match="more than the file system's"):
        check_output(tmp_path / ("x" * 300))
    with pytest.raises(PeftmergeError, match="cannot write output"):
        check_output("/sys/peftmerge-probe/out")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(PeftmergeError, match="symbolic link"):
        check_output(tmp_path / "dangling")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "file"]  # the probe left nothing


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_folders_of_dead_runs_are_removed(tmp_path):
    out = tmp_path / "merged"
    prefix = temp_prefix(out)
    dead, live = tmp_path / f"{prefix}{dead_pid()}-abc", tmp_path / f"{prefix}{os.getpid()}-def"
    dead.mkdir()
    (dead / "adapter_model.safetensors").write_bytes(b"half")
    live.mkdir()
    other = tmp_path / f"{temp_prefix(tmp_path / 'other')}{dead_pid()}-x"  # another output's: not ours to judge
    other.mkdir()
    half_file = tmp_path / f"{prefix}{dead_pid()}-xyz.safetensors"
    half_file.write_bytes(b"half")
    old = tmp_path / f".merged.old-{dead_pid()}-q"  # a swap that was killed half way: the old output comes back
    (old / "merged").mkdir(parents=True)
    (old / "merged" / "peftmerge.json").write_text("{}")
    assert set(clean_stale(out)) == {dead, half_file, old}
    assert live.exists() and other.exists() and (out / "peftmerge.json").is_file()


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_modes_follow_the_umask(umask, tmp_path):
    before = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "adapter_model.safetensors").write_bytes(b"w")
            (tmp / "heads").mkdir()
        with atomic_file(tmp_path / "g.safetensors") as tmp:
            tmp.write_bytes(b"g")
    finally:
        os.umask(before)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "out") == mode(tmp_path / "out" / "heads") == 0o777 & ~umask
    assert mode(tmp_path / "out" / "adapter_model.safetensors") == mode(tmp_path / "g.safetensors") == 0o666 & ~umask


def test_a_failure_leaves_nothing_not_even_the_parent_folders_it_made(tmp_path):
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "x").write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        with atomic_file(out / "f.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
