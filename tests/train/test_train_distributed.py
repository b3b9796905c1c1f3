"""``peftmerge train`` under ``torchrun`` and ``accelerate launch``: 2 CPU processes (gloo) train data-parallel.

The reference is a single-process run with the same global batch (2 x 4 rows = 8) and seed: the adapters
must agree to float32 rounding (the loss is averaged over the global batch's completion tokens, whose
counts differ per row here). Only the main process writes the output folder; a run resumed from a
checkpoint under the other launcher ends at the same adapter.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftmerge
from train_fixtures import FILLER, NEG, POS, make_llama, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peftmerge.train import TrainConfig, train  # noqa: E402

ROOT = Path(peftmerge.__file__).resolve().parents[1]
# --lora-r, not --r: torchrun's and accelerate's parsers read --r as an ambiguous abbreviation of their own options.
ARGS = ["--task", "t", "--lora-r", "4", "--alpha", "8", "--target-modules", "q_proj,v_proj", "--max-steps", "4",
        "--batch-size", "4", "--max-length", "64", "--lr", "1e-2", "--dropout", "0", "--logging-steps", "1",
        "--eval-steps", "2", "--no-eval-before", "--seed", "7"]


def _rows(n: int) -> list[dict]:
    """Prompt/completion rows whose completions have 1 to 5 words: per-process token counts differ."""
    rng = random.Random(0)
    return [{"prompt": " ".join(rng.sample(FILLER, rng.randint(2, 6))),
             "completion": " " + " ".join(rng.sample(POS + NEG, rng.randint(1, 5)))} for _ in range(n)]


def _port() -> str:
    with socket.socket() as s:  # a free port: other test runs on this machine may hold the default 29500
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch(launcher: list[str], args: list, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", *launcher, "-m", "peftmerge.cli.main", "train", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _assert_same_adapter(got: Path, want: Path) -> None:
    a, b = load_file(str(got / "adapter_model.safetensors")), load_file(str(want / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    moved = max(float(b[k].abs().max()) for k in b if "lora_B" in k)
    assert moved > 1e-3  # training moved B away from its zero init, so equality means something
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama, 16 rows, and the single-process reference (batch 8 = the 2-process global batch)."""
    root = tmp_path_factory.mktemp("dist")
    model = make_llama(root / "llama")
    data = write_jsonl(root / "train.jsonl", _rows(16))
    cfg = dict(model=str(model), data=str(data), task="t", r=4, alpha=8, target_modules="q_proj,v_proj", max_steps=4,
               batch_size=8, max_length=64, lr=1e-2, dropout=0.0, logging_steps=1, eval_steps=2, eval_before=False,
               seed=7)
    train(TrainConfig(out=str(root / "single"), **cfg))
    return root, model, data


@pytest.fixture(scope="module")
def torchrun_run(setup):
    root, model, data = setup
    r = _launch(["torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                 "--master-port", _port()],
                ["--model", model, "--data", data, "-o", root / "torchrun", "--checkpoint-dir", root / "ck",
                 "--keep-checkpoints", *ARGS], root)
    return r


def test_torchrun_two_processes_equal_one_and_one_writer(setup, torchrun_run):
    root, _, _ = setup
    r = torchrun_run
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("t: wrote") == 1, r.stdout  # one report: the main process's
    out = root / "torchrun"
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "peftmerge.json",
                                              "README.md"}
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]  # no half-written folder of a second writer
    # Two processes trained: each saved its own RNG state into the checkpoints.
    assert {p.name for p in (root / "ck" / "checkpoint-2").glob("rng_state_*.pth")} == {"rng_state_0.pth",
                                                                                         "rng_state_1.pth"}
    _assert_same_adapter(out, root / "single")


def test_accelerate_resumes_the_torchrun_checkpoint(setup, torchrun_run):
    """``accelerate launch`` with 2 processes, resumed from step 2 of the torchrun run: the same final adapter."""
    root, model, data = setup
    assert torchrun_run.returncode == 0, torchrun_run.stderr[-3000:]
    ck = root / "ck-resume"
    shutil.copytree(root / "ck" / "checkpoint-2", ck / "checkpoint-2")
    # with its ownership record: --resume takes over another output's peftmerge checkpoints, never foreign ones
    shutil.copy(root / "ck" / "peftmerge-checkpoints.json", ck / "peftmerge-checkpoints.json")
    r = _launch(["accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", _port()],
                ["--model", model, "--data", data, "-o", root / "accelerate", "--checkpoint-dir", ck, "--resume", *ARGS],
                root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("t: wrote") == 1, r.stdout
    assert not ck.exists()  # removed after success, once
    _assert_same_adapter(root / "accelerate", root / "single")
    _assert_same_adapter(root / "accelerate", root / "torchrun")


def test_qlora_places_each_process_on_its_local_gpu(monkeypatch):
    """QLoRA loads its 4-bit base onto the process's own GPU (``LOCAL_RANK``); on CPUs it lets bitsandbytes place it."""
    from peftmerge.io import model_loader as base

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert base._device_map() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert base._device_map() == {"": 1}
    monkeypatch.delenv("LOCAL_RANK")
    assert base._device_map() == {"": 0}
