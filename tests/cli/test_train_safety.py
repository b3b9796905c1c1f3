"""``peftmerge train`` deletes only the checkpoints its runs wrote, whatever --checkpoint-dir is."""

from __future__ import annotations

from click.testing import CliRunner
from train_fixtures import make_llama, sentiment_rows, write_jsonl

from peftmerge.cli.main import main


def test_checkpoint_dir_dot_removes_only_this_runs_checkpoints(tmp_path, monkeypatch):
    llama = make_llama(tmp_path / "llama")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    data = write_jsonl(work / "train.jsonl", sentiment_rows(8))
    (work / "keep.txt").write_text("mine")
    (work / "notes").mkdir()
    (work / "notes" / "n.md").write_text("mine too")
    def args(out, checkpoints):
        return ["train", "--model", str(llama), "--data", "train.jsonl", "--task", "t", "-o", out, "--max-steps", "2",
                "--eval-steps", "1", "--r", "2", "--target-modules", "q_proj", "--batch-size", "4", "--max-length",
                "32", "--checkpoint-dir", checkpoints, "--quiet"]

    r = CliRunner().invoke(main, args("adapter", "."))
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in work.iterdir()) == ["adapter", "keep.txt", "notes", "train.jsonl"]
    assert (work / "keep.txt").read_text() == "mine" and data.read_text().count("\n") == 8
    assert (work / "adapter" / "adapter_model.safetensors").is_file()

    # a folder of someone else's checkpoints is refused before anything is written: transformers would rotate them
    theirs = work / "theirs"
    (theirs / "checkpoint-9").mkdir(parents=True)
    r = CliRunner().invoke(main, args("adapter2", "theirs"))
    assert r.exit_code == 2 and "did not write" in r.stderr and (theirs / "checkpoint-9").is_dir()
    assert not (work / "adapter2").exists()
