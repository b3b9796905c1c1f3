"""Faults in real child processes: kill -9 in the merge and in the write phase, two processes writing one output,
a full disk (a file size limit, as ``ulimit -f``) during combine and during train, then ``--resume``.

After each: no visible or hidden partial output once the next run of the same output is done, inputs unchanged,
and the next run (or ``--resume``) completes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_adapter
from hostile_world import snapshot

from peftmerge.cli.main import main

RUNNER = Path(__file__).with_name("fault_runner.py")


def child(pause: str, args: list, tmp_path: Path, **env) -> subprocess.Popen:
    environ = {**os.environ, "FAULT_READY": str(tmp_path / f"ready-{pause}-{time.monotonic_ns()}"),
               "FAULT_GO": str(tmp_path / "go"), "OMP_NUM_THREADS": "1", **env}
    proc = subprocess.Popen([sys.executable, str(RUNNER), pause, *map(str, args)], env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.ready = Path(environ["FAULT_READY"])
    return proc


def wait_ready(proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not proc.ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child ended before its pause: {proc.returncode}\n{proc.stderr.read()}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("child never reached its pause")
        time.sleep(0.02)


def kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)  # reaped: the pid in a leftover name is gone


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture
def pair(tmp_path):
    a = make_adapter(tmp_path / "in" / "a", seed=1, r=4, alpha=8)
    b = make_adapter(tmp_path / "in" / "b", seed=2, r=4, alpha=8)
    return a, b


@pytest.mark.parametrize("phase", ["merge", "write"])
def test_kill_9_leaves_nothing_after_the_next_run(phase, pair, tmp_path):
    a, b = pair
    out = tmp_path / "out" / "merged"
    args = ["combine", str(a), str(b), "-o", str(out), "--method", "task_arithmetic", "--quiet"]
    inputs = snapshot(tmp_path / "in")
    proc = child(phase, args, tmp_path)
    try:
        wait_ready(proc)
        live = hidden(out.parent) if out.parent.exists() else []
        assert bool(live) == (phase == "write"), live  # writing: its temporary folder, ours by name
        if phase == "write":  # a run meanwhile never takes the folder of a writer that is alive
            r = CliRunner().invoke(main, args)
            assert r.exit_code == 0 and set(live) <= set(hidden(out.parent)), r.output
            args.append("--overwrite")
    finally:
        kill9(proc)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert hidden(out.parent) == [] and sorted(p.name for p in out.parent.iterdir()) == ["merged"]
    assert (out / "adapter_model.safetensors").is_file() and snapshot(tmp_path / "in") == inputs


def test_two_writers_one_output(pair, tmp_path):
    from peftmerge.io.adapter import load_adapter

    a, b = pair
    out = tmp_path / "merged"
    procs = [child("swap", ["combine", a, b, "-o", out, "--method", m, "--quiet"], tmp_path)
             for m in ("task_arithmetic", "ties")]
    for p in procs:
        wait_ready(p)
    (tmp_path / "go").write_text("")  # both have written everything: now both rename
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 0], [0, 2]), results  # one wins; the other refuses (or, losing no data, also lands)
    for code, err in results:
        if code == 2:
            assert "written by another run meanwhile" in one_error_line(err)
    method = json.loads((out / "merge_report.json").read_text())["method"]
    assert method in ("task_arithmetic", "ties")
    merged = load_adapter(out)  # a whole, valid adapter of one of the two runs
    assert set(merged.modules) == set(load_adapter(a).modules) and hidden(tmp_path) == []


def test_disk_full_during_combine(pair, tmp_path):
    a, b = pair
    out = tmp_path / "merged"
    inputs = snapshot(tmp_path / "in")
    r = subprocess.run(["bash", "-c", f'ulimit -f 4; exec "{sys.executable}" "{RUNNER}" none combine "{a}" "{b}" '
                        f'-o "{out}" --method task_arithmetic'], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stderr
    assert "writing" in one_error_line(r.stderr) and "size limit" in r.stderr
    assert not out.exists() and hidden(tmp_path) == [] and snapshot(tmp_path / "in") == inputs
    r = CliRunner().invoke(main, ["combine", str(a), str(b), "-o", str(out), "--method", "task_arithmetic", "--quiet"])
    assert r.exit_code == 0 and (out / "adapter_model.safetensors").is_file()


def test_disk_full_during_training_then_resume(tmp_path):
    from safetensors.torch import load_file
    from train_fixtures import make_llama, sentiment_rows, write_jsonl

    llama = make_llama(tmp_path / "llama")
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(8, seed=3))
    ckpt = tmp_path / "ckpt"
    common = ["train", "--model", llama, "--data", data, "--task", "t", "--max-steps", "4", "--eval-steps", "2",
              "--r", "2", "--target-modules", "q_proj,v_proj", "--batch-size", "4", "--max-length", "32",
              "--lr", "1e-3", "--dropout", "0", "--scheduler", "constant"]
    args = [*common, "--checkpoint-dir", ckpt, "-o", tmp_path / "a"]
    out = tmp_path / "a"
    proc = child("fsize-after-checkpoint", args, tmp_path, FAULT_CHECKPOINT=str(ckpt / "checkpoint-2"))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert "--resume" in one_error_line(err)
    assert not out.exists() and hidden(tmp_path) == []
    assert (ckpt / "checkpoint-2" / "peftmerge-complete").is_file()  # the complete one is kept for --resume

    r = CliRunner().invoke(main, [str(x) for x in [*args, "--resume", "--quiet"]])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "peftmerge.json").read_text())["metrics"]["train_steps"] == 4
    assert not ckpt.exists()  # this output's checkpoints (and the folder made for them) are gone

    # the same adapter as a run that was never interrupted
    r = CliRunner().invoke(main, [str(x) for x in [*common, "-o", tmp_path / "b", "--quiet"]])
    assert r.exit_code == 0, r.output
    want = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    got = load_file(str(out / "adapter_model.safetensors"))
    assert want.keys() == got.keys()
    for k in want:
        assert (want[k] - got[k]).abs().max() < 1e-5, k
