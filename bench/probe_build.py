"""How long ``peftmerge route build --strategy probe`` takes with a SmolLM2 embedder at layer 0, from the CLI.

The router of the MiniLM benchmark (examples/multitask/run.py's ``probe-smol``): the four MiniLM adapters in
examples/adapters/minilm (sst2, agnews, mrpc, sms_spam), example inputs from each task's train split in
../shared/data (``--max-examples``, default 20,000 per task: sst2 20,000, agnews 9,001, mrpc 3,676, sms_spam
4,460 rows), SmolLM2-135M-Instruct's token embeddings as ``--embedder`` (the GGUF wheel, given by its Hub id:
the installed copy stands in), sentence pairs by segments. Each run is a whole ``peftmerge`` process
(``OMP_NUM_THREADS=--threads``), wall time and CPU time (user + system; other processes' load inflates it far
less than wall time on shared cores):

- ``cold``: a fresh ``$PEFTMERGE_CACHE``, so the GGUF file is converted to a plain folder first (once per machine);
- ``warm``: the same command again (the plain copy cached).

Then, in this process, the stages of a warm build (examples, loading the embedder, embedding, fitting the probe)
and the router's routing accuracy on the first ``--test-rows`` test rows per task (``route eval``).

    nice -n 10 python bench/probe_build.py                 # 2 threads, 20,000 examples per task
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = next((d / "shared" / "data" for d in ROOT.parents if (d / "shared" / "data").is_dir()),
            ROOT.parent / "shared" / "data")
TASKS = ["sst2", "agnews", "mrpc", "sms_spam"]
EMBEDDER = "HuggingFaceTB/SmolLM2-135M-Instruct"


def build_cmd(out: Path, n: int) -> list[str]:
    adapters = [str(ROOT / "examples" / "adapters" / "minilm" / t) for t in TASKS]
    examples = [x for t in TASKS for x in ("--examples", f"{t}={DATA / t / 'train.jsonl'}")]
    return [sys.executable, "-m", "peftmerge.cli.main", "route", "build", *adapters, "--strategy", "probe", *examples,
            "--max-examples", str(n), "--embedder", EMBEDDER, "--layer", "0", "-o", str(out), "--overwrite"]


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system of the process) of one run of ``cmd``."""
    t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - t0, (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)


def stages(n: int, threads: int) -> dict:
    import torch

    from peftmerge.routing import load, registry

    torch.set_num_threads(threads)
    out = {}
    t0 = time.perf_counter()
    adapters = load.open_adapters([ROOT / "examples" / "adapters" / "minilm" / t for t in TASKS])
    examples = load.examples_of(adapters, {t: str(DATA / t / "train.jsonl") for t in TASKS}, n)
    out["examples_s"], out["rows"] = time.perf_counter() - t0, sum(map(len, examples.values()))
    t0 = time.perf_counter()
    embed = load.load_embedder(EMBEDDER, layer=0, pairs="segments")
    out["load_embedder_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    xs = [embed(examples[t]) for t in TASKS]
    out["embed_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    spec = registry.get("probe")
    x = torch.cat(xs)
    y = torch.cat([torch.full((len(e),), i, dtype=torch.long) for i, e in enumerate(xs)])
    from peftmerge.routing.probe import fit_probe

    fit_probe(x, y, len(TASKS), spec.resolve({}))
    out["fit_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-examples", type=int, default=20000)
    p.add_argument("--test-rows", type=int, default=300)
    a = p.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(a.threads), "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        router = Path(tmp) / "router"
        cold = timed(build_cmd(router, a.max_examples), {**env, "PEFTMERGE_CACHE": str(Path(tmp) / "cache")})
        warm = timed(build_cmd(router, a.max_examples), env)
        parts = stages(a.max_examples, a.threads)
        from peftmerge.routing.api import route_eval

        report = route_eval(str(router), {t: str(DATA / t / "test.jsonl") for t in TASKS}, limit=a.test_rows)
    result = {"threads": a.threads, "max_examples": a.max_examples, "cold_s": round(cold[0], 1),
              "cold_cpu_s": round(cold[1], 1), "warm_s": round(warm[0], 1), "warm_cpu_s": round(warm[1], 1),
              "load_average": [round(x, 2) for x in os.getloadavg()], "stages": {k: round(v, 2) for k, v in parts.items()},
              "routing_accuracy": round(report["accuracy"], 4),
              "per_task": {t: round(r["accuracy"], 4) for t, r in report["tasks"].items()},
              "cpus": os.cpu_count()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
