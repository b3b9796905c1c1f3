"""The README's walk-through and methods table follow the code: its commands run, as written, on a tiny model.

The walk-through's commands are read from README.md and run one by one as a user runs them (``bash -c``, the
installed ``peftmerge`` console script), with ``$MINILM`` a tiny random BERT with a tokenizer and ``$DATA`` two
small task folders shaped like ``../shared/data`` (``agnews``' task.json names its task ``topic``, as the real
one does). Each must exit 0 and write nothing to stderr that reads as a problem (a library warning, a load
report, a traceback).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path


from peftmerge.cli.methods import README_MARK, readme_table

from train_fixtures import FILLER, NEG, POS, make_bert

README = Path(__file__).resolve().parents[2] / "README.md"
# stderr lines a user would read as something wrong
NOISE = re.compile(r"warn|load report|missing|unexpected|corrupt|failed|deprecat|traceback|error", re.I)


def walkthrough() -> list[str]:
    """The commands of the README's walk-through block, continuation lines joined."""
    text = README.read_text()
    block = text[text.index("<!-- walk-through"):text.index("<!-- end walk-through -->")]
    body = block[block.index("```bash\n") + 8:block.rindex("```")]
    return [c.strip() for c in body.replace("\\\n", " ").splitlines() if c.strip()]


def task_folder(root: Path, name: str, task: str, labels: list[str], seed: int) -> None:
    rng = random.Random(seed)
    folder = root / name
    folder.mkdir(parents=True)
    for split, n in (("train", 48), ("validation", 16), ("test", 24)):
        rows = []
        for _ in range(n):
            i = rng.randrange(len(labels))
            cue = (POS + NEG)[i * 3 % len(POS + NEG)]
            rows.append({"text": " ".join(rng.sample(FILLER, 4) + [cue]), "label": labels[i]})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "task.json").write_text(json.dumps({"task": task, "labels": labels, "fields": ["text"]}))


def test_readme_methods_table_is_the_registry():
    assert readme_table() in README.read_text(), "regenerate the README table: peftmerge methods --readme"
    assert README_MARK in readme_table()


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 200


def test_readme_walkthrough_runs_quietly(tmp_path):
    commands = walkthrough()
    assert [c.split()[:2] for c in commands[2:]] == [
        ["peftmerge", "train"], ["peftmerge", "train"], ["peftmerge", "combine"], ["peftmerge", "eval"],
        ["peftmerge", "route"], ["peftmerge", "route"], ["peftmerge", "push"]]
    assert commands[0].startswith("MINILM=") and commands[1].startswith("DATA=")
    data = tmp_path / "data"
    task_folder(data, "sst2", "sentiment", ["negative", "positive"], 0)
    task_folder(data, "agnews", "topic", ["world", "sports", "business", "sci/tech"], 1)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "MINILM": str(make_bert(tmp_path / "minilm")), "DATA": str(data), "HF_HUB_OFFLINE": "1",
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"}
    env.pop("HF_TOKEN", None)
    work = tmp_path / "work"
    work.mkdir()
    for command in commands[2:]:
        r = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{command}\n{r.stdout}\n{r.stderr}"
        noise = [line for line in re.split(r"[\r\n]", r.stderr) if NOISE.search(line)]
        assert not noise, f"{command}: {noise}"
    assert {"sst2", "agnews"} <= {p.stem for p in (work / "merged" / "heads").iterdir()}
    results = json.loads((work / "results" / "merged.json").read_text())
    assert results and (work / "router").is_dir()
