"""``peftmerge push`` against a fake Hub on 127.0.0.1 (tests/fake_hub.py): what arrives, and the errors."""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket

import pytest
from click.testing import CliRunner
from conftest import make_adapter, tiny_llama
from fake_hub import FakeHub, point_client_at
from huggingface_hub import ModelCard

from peftmerge.io.card import with_results
from peftmerge.cli.main import main
from peftmerge.errors import PeftmergeError
from peftmerge.hub.push import detect_kind, push, scrub

TOKENS = {"hf_bob": "bob", "hf_alice": "alice"}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with FakeHub(TOKENS) as h:
        point_client_at(h, monkeypatch, tmp_path)
        yield h


@contextlib.contextmanager
def offline():
    """Build test folders with the network shut (PEFT looks base models up on the Hub when online)."""
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as m:
        m.setenv("HF_HUB_OFFLINE", "1")
        m.setattr(constants, "HF_HUB_OFFLINE", True)
        yield


def snapshot(folder):
    """{relative path: sha256} of every file: to check a folder is left exactly as it was."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def card_of(files) -> ModelCard:
    return ModelCard(files["README.md"].decode())


def recipe_of(card: ModelCard) -> dict:
    return json.loads(card.text.split("## Recipe")[1].split("```json")[1].split("```")[0])


@pytest.fixture
def merged_adapter(tmp_path):
    from peftmerge.merge.combine import combine

    out = tmp_path / "merged"
    with offline():
        a = make_adapter(tmp_path / "a", seed=1, base_name="org/tiny-llama")
        b = make_adapter(tmp_path / "b", seed=2, base_name="org/tiny-llama")
        combine([str(a), str(b)], out, "ties", density=0.5, progress=False)
    (out / "results.json").write_text(json.dumps({"tasks": {"sst2": {"accuracy": 0.75}}}))
    return out


@pytest.fixture
def merged_model(tmp_path):
    out = tmp_path / "full"
    with offline():
        tiny_llama(0).save_pretrained(out)
    (out / "merge_report.json").write_text(json.dumps({
        "method": "task_arithmetic", "params": {"lambda": 0.5}, "base_model": "org/tiny-llama",
        "inputs": [{"path": "/data/a", "sha256": "ab" * 32}, {"source": "bob/b", "revision": "c" * 40}],
        "per_module": [{"module": "x", "relative_error": 0.0}],
    }))
    (out / "results.json").write_text(json.dumps({"sst2": {"accuracy": 0.8125, "n": 16}}))
    return out


def test_push_merged_adapter_from_cli(hub, merged_adapter, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_bob")
    before = snapshot(merged_adapter)
    r = CliRunner().invoke(main, ["push", str(merged_adapter), "--repo-id", "bob/merged"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == f"{hub.url}/bob/merged"
    assert snapshot(merged_adapter) == before  # the folder is untouched

    repo = hub.repos["bob/merged"]
    files = repo.branches["main"]
    assert set(files) == set(before) | {".gitattributes"}
    for path in set(before) - {"README.md"}:  # as they are, but for the local paths replaced by names
        local = (merged_adapter / path).read_bytes()
        if path.endswith(".json"):
            assert json.loads(files[path]) == scrub(json.loads(local)), path
        else:
            assert files[path] == local, path
    inputs = json.loads(files["merge_report.json"])["inputs"]
    assert [i["path"] for i in inputs] == ["a", "b"]  # not the absolute local folders
    assert not [p for p, data in files.items() if str(merged_adapter.parent).encode() in data]
    # the weights went through LFS, the JSON files as regular git blobs
    assert "adapter_model.safetensors" in repo.lfs_paths and "adapter_config.json" not in repo.lfs_paths
    assert hashlib.sha256(files["adapter_model.safetensors"]).hexdigest() in hub.lfs
    assert repo.commits[-1]["message"] == "Upload merged-adapter with peftmerge 0.1.0"

    card = card_of(files)  # the card combine wrote, with the results of the later eval added
    assert card.data.base_model == "org/tiny-llama" and card.data.base_model_relation == "merge"
    assert card.data.library_name == "peft"
    assert {"peftmerge", "merge", "lora", "ties"} <= set(card.data.tags)
    recipe = recipe_of(card)
    assert recipe["method"] == "ties" and recipe["params"]["density"] == 0.5
    assert [len(i["sha256"]) for i in recipe["inputs"]] == [64, 64]
    assert "| sst2 | 0.7500 |" in card.text
    local = ModelCard.load(merged_adapter / "README.md")
    assert "## Results" not in local.text and 'from_pretrained(base, "REPO_ID")' in local.text
    # the same card, with the repo id in the usage snippet, the results added and no local path
    assert card.text == scrub(with_results(ModelCard(local.content.replace("REPO_ID", "bob/merged")), {
        "sst2": {"accuracy": 0.75}}).text)


def test_push_generates_card_without_touching_folder(hub, merged_model):
    before = snapshot(merged_model)
    assert "README.md" not in before
    url = push(merged_model, "bob/full", private=True, revision="dev", commit_message="first full model",
               token="hf_bob")
    assert url == f"{hub.url}/bob/full/tree/dev"
    assert snapshot(merged_model) == before  # no README.md written locally

    repo = hub.repos["bob/full"]
    assert repo.private and repo.commits[-1] == {**repo.commits[-1], "branch": "dev", "message": "first full model"}
    assert set(repo.branches["main"]) == {".gitattributes"}  # only the branch got the files
    files = repo.branches["dev"]
    assert set(files) == set(before) | {".gitattributes", "README.md"}
    assert files["model.safetensors"] == (merged_model / "model.safetensors").read_bytes()

    card = card_of(files)
    assert card.data.base_model == "org/tiny-llama" and card.data.base_model_relation == "merge"
    assert card.data.library_name == "transformers"
    assert {"peftmerge", "merge", "task_arithmetic"} <= set(card.data.tags)
    recipe = recipe_of(card)
    assert recipe["params"] == {"lambda": 0.5} and recipe["peftmerge_version"] == "0.1.0"
    assert "per_module" not in recipe  # diagnostics stay in merge_report.json
    assert "| sst2 | 0.8125 | 16 |" in card.text
    assert f"sha256 `{'ab' * 32}`" in card.text and f"revision `{'c' * 40}`" in card.text
    assert 'from_pretrained("bob/full")' in card.text


def test_push_router_with_nested_adapters(hub, tmp_path):
    router = tmp_path / "router"
    for task, seed in (("sst2", 1), ("agnews", 2)):
        with offline():
            make_adapter(router / "adapters" / task, seed=seed, base_name="org/tiny-llama")
    (router / "router.json").write_text(json.dumps({"base_model": "org/tiny-llama", "method": "knn",
                                                    "adapters": {"sst2": "adapters/sst2", "agnews": "adapters/agnews"}}))
    assert detect_kind(router) == "router"
    push(router, "bob/router", token="hf_bob")
    files = hub.repos["bob/router"].branches["main"]
    assert {"adapters/sst2/adapter_model.safetensors", "adapters/agnews/adapter_config.json", "router.json"} <= set(files)
    assert files["adapters/sst2/adapter_model.safetensors"] == (
        router / "adapters/sst2/adapter_model.safetensors").read_bytes()
    card = card_of(files)
    assert {"peftmerge", "lora", "router"} <= set(card.data.tags) and "merge" not in card.data.tags
    assert card.data.base_model_relation == "adapter" and card.data.library_name is None
    assert recipe_of(card)["router"]["method"] == "knn"


def test_push_twice_same_repo_and_lfs_dedup(hub, tmp_path, monkeypatch):
    with offline():
        adapter = make_adapter(tmp_path / "a", seed=1, base_name="org/tiny-llama")
    assert detect_kind(adapter) == "adapter"
    monkeypatch.setenv("HF_TOKEN", "hf_bob")
    push(adapter, "bob/a")
    puts = [p for m, p in hub.requests if m == "PUT"]
    push(adapter, "bob/a", commit_message="again")  # repo exists: fine; weights already stored: not re-sent
    assert [p for m, p in hub.requests if m == "PUT"] == puts
    assert [c["message"] for c in hub.repos["bob/a"].commits][-2:] == ["Upload adapter with peftmerge 0.1.0", "again"]


def test_no_token(hub, merged_adapter):
    before = snapshot(merged_adapter)
    r = CliRunner().invoke(main, ["push", str(merged_adapter), "--repo-id", "bob/merged"])
    assert r.exit_code == 2
    assert "no Hugging Face token: set HF_TOKEN or run `hf auth login`" in r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not [p for _, p in hub.requests if "repos/create" in p] and snapshot(merged_adapter) == before


def test_bad_token(hub, merged_adapter):
    with pytest.raises(PeftmergeError, match=r"refused the token \(HTTP 401"):
        push(merged_adapter, "bob/merged", token="hf_wrong")


def test_repo_owned_by_someone_else(hub, merged_adapter, monkeypatch):
    hub.add_repo("alice/taken", owner="alice", files={"README.md": b"alice's"})
    monkeypatch.setenv("HF_TOKEN", "hf_bob")
    before = snapshot(merged_adapter)
    r = CliRunner().invoke(main, ["push", str(merged_adapter), "--repo-id", "alice/taken"])
    assert r.exit_code == 2
    assert "cannot write to alice/taken (HTTP 403" in r.output and "push to a repo in your own namespace" in r.output
    assert f"the local output {merged_adapter} is kept" in r.output and len(r.output.strip().splitlines()) == 1
    assert hub.repos["alice/taken"].branches["main"]["README.md"] == b"alice's"
    assert snapshot(merged_adapter) == before


def test_invalid_card_metadata_rejected(hub, merged_adapter, tmp_path):
    folder = tmp_path / "bad-card"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).write_bytes((merged_adapter / name).read_bytes())
    (folder / "README.md").write_text("---\nbase_model: org/x\nbase_model_relation: cousin\n---\n# hand-written\n")
    with pytest.raises(PeftmergeError, match=r"the Hub rejected the upload to bob/bad \(HTTP 400.*README.md"):
        push(folder, "bob/bad", token="hf_bob")
    assert not [p for _, p in hub.requests if "/commit/" in p]  # refused before anything was committed


def test_private_repo_of_someone_else(hub, merged_adapter):
    hub.add_repo("alice/secret", owner="alice", private=True)
    with pytest.raises(PeftmergeError, match=r"cannot write to alice/secret \(HTTP 403"):
        push(merged_adapter, "alice/secret", token="hf_bob")


def test_server_down(monkeypatch, tmp_path, merged_adapter):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    point_client_at(f"http://127.0.0.1:{port}", monkeypatch, tmp_path)
    before = snapshot(merged_adapter)
    r = CliRunner().invoke(main, ["push", str(merged_adapter), "--repo-id", "bob/merged"], env={"HF_TOKEN": "hf_bob"})
    assert r.exit_code == 2
    assert f"cannot reach the Hub at http://127.0.0.1:{port} (network down?)" in r.output
    assert snapshot(merged_adapter) == before


def test_bad_inputs(hub, tmp_path, merged_adapter, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_bob")
    runner = CliRunner()
    r = runner.invoke(main, ["push", str(tmp_path / "missing"), "--repo-id", "bob/x"])
    assert r.exit_code == 2 and "no such directory" in r.output
    (tmp_path / "junk").mkdir()
    r = runner.invoke(main, ["push", str(tmp_path / "junk"), "--repo-id", "bob/x"])
    assert r.exit_code == 2 and "not a peftmerge output" in r.output
    r = runner.invoke(main, ["push", str(merged_adapter), "--repo-id", "not a repo"])
    assert r.exit_code == 2 and "is not a Hub repo id" in r.output
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = runner.invoke(main, ["push", str(merged_adapter), "--repo-id", "bob/x"])
    assert r.exit_code == 2 and "HF_HUB_OFFLINE=1 is set" in r.output
    assert not [p for _, p in hub.requests if "repos/create" in p]


def test_push_to_hub_option_and_maybe_push(hub, merged_adapter, monkeypatch):
    import click

    from peftmerge.cli.common import Group
    from peftmerge.cli.push import maybe_push, push_to_hub_option

    @click.group(cls=Group)
    def cli():
        pass

    @cli.command("demo")
    @click.argument("folder")
    @push_to_hub_option
    def demo(folder, push_to_hub):
        maybe_push(folder, push_to_hub)

    monkeypatch.setenv("HF_TOKEN", "hf_bob")
    runner = CliRunner()
    assert runner.invoke(cli, ["demo", str(merged_adapter)]).exit_code == 0 and "bob/demo" not in hub.repos
    r = runner.invoke(cli, ["demo", str(merged_adapter), "--push-to-hub", "bob/demo"])
    assert r.exit_code == 0 and r.stdout.strip() == f"pushed {merged_adapter} to {hub.url}/bob/demo"
    assert "adapter_model.safetensors" in hub.repos["bob/demo"].branches["main"]
    r = runner.invoke(cli, ["demo", str(merged_adapter), "--push-to-hub", "bad id"])
    assert r.exit_code == 2 and "is not a Hub repo id" in r.output


def test_combine_reads_hub_ids_and_pushes(hub, tmp_path, monkeypatch):
    """`peftmerge combine bob/a bob/b --push-to-hub bob/merged`: inputs come through the HF cache."""
    monkeypatch.setenv("HF_TOKEN", "hf_bob")
    with offline():
        a = make_adapter(tmp_path / "a", seed=1, base_name="org/tiny-llama")
        b = make_adapter(tmp_path / "b", seed=2, base_name="org/tiny-llama")
    for name, folder in (("bob/a", a), ("bob/b", b)):
        hub.add_repo(name, "bob", {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})
    out = tmp_path / "merged"
    r = CliRunner().invoke(main, ["combine", "bob/a", "bob/b", "-o", str(out), "--method", "task_arithmetic",
                                  "--quiet", "--push-to-hub", "bob/merged"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "merge_report.json").read_text())
    assert [i["path"] for i in report["inputs"]] == ["bob/a", "bob/b"]
    assert all(len(i["revision"]) == 40 for i in report["inputs"])
    pushed = hub.repos["bob/merged"].branches["main"]
    assert pushed["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()
    recipe = recipe_of(card_of(pushed))
    assert [i["path"] for i in recipe["inputs"]] == ["bob/a", "bob/b"]


def test_train_push_to_hub(hub, tmp_path, monkeypatch):
    """`peftmerge train ... --push-to-hub bob/sst2` uploads the trained adapter with its card."""
    from train_fixtures import make_llama, sentiment_rows, write_jsonl

    monkeypatch.setenv("HF_TOKEN", "hf_bob")
    with offline():
        llama = make_llama(tmp_path / "llama")
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(8))
    r = CliRunner().invoke(main, ["train", "--model", str(llama), "--data", str(data), "--task", "sst2",
                                  "-o", str(tmp_path / "a"), "--r", "4", "--target-modules", "q_proj,v_proj",
                                  "--max-steps", "1", "--batch-size", "4", "--max-length", "64",
                                  "--push-to-hub", "bob/sst2"])
    assert r.exit_code == 0, r.output
    pushed = hub.repos["bob/sst2"].branches["main"]
    assert pushed["adapter_model.safetensors"] == (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    assert json.loads(pushed["peftmerge.json"])["task"] == "sst2"
    card = card_of(pushed)  # trained from a local folder: named (not its local path), not in the Hub's metadata
    assert card.data.base_model is None and "`llama`" in card.text and "tags" in card.data.to_dict()
    assert not [p for p, data in pushed.items() if str(tmp_path).encode() in data]


# --- what goes up: the allow-list, no symlink out of the folder, no local path, never the token ------------------

@pytest.fixture
def cluttered(merged_adapter, tmp_path):
    """A merged adapter folder that also holds what must never be uploaded."""
    import shutil

    folder = tmp_path / "cluttered"
    shutil.copytree(merged_adapter, folder)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "private.safetensors").write_bytes(b"not for the Hub")
    (outside / "notes.md").write_text("private")
    (folder / ".env").write_text("HF_TOKEN=hf_secret_in_env\n")
    (folder / "secrets").mkdir()
    (folder / "secrets" / "key.txt").write_text("ssh key")
    (folder / "notes.txt").write_text("my notes")
    (folder / "linked.safetensors").symlink_to(outside / "private.safetensors")
    (folder / "README.md").unlink()  # a generated card, this time
    os_link_dir = folder / "heads_link"
    os_link_dir.symlink_to(outside, target_is_directory=True)
    (folder / "heads").mkdir()
    (folder / "heads" / "sst2.safetensors").write_bytes((merged_adapter / "adapter_model.safetensors").read_bytes())
    (folder / "bars.png").write_bytes(b"\x89PNG fake")
    return folder


ALLOWED_UPLOAD = {"adapter_config.json", "adapter_model.safetensors", "peftmerge.json", "merge_report.json",
                  "results.json", "README.md", "heads/sst2.safetensors", "bars.png"}


def test_push_uploads_only_what_peftmerge_writes(hub, cluttered, tmp_path, monkeypatch, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HF_TOKEN", "hf_bob")
    before = snapshot(cluttered)
    r = CliRunner().invoke(main, ["push", str(cluttered), "--repo-id", "bob/clean"])
    assert r.exit_code == 0, r.output
    files = hub.repos["bob/clean"].branches["main"]
    assert set(files) - {".gitattributes"} == ALLOWED_UPLOAD
    assert snapshot(cluttered) == before
    for path, data in files.items():  # no local path, no token, nothing from outside the folder
        assert str(tmp_path).encode() not in data and b"hf_bob" not in data and b"not for the Hub" not in data, path
    assert "hf_bob" not in r.output and "hf_bob" not in caplog.text
    card = card_of(files)
    assert "## Inputs" in card.text and "| `a` | 1.0 |" in card.text  # names and weights, not local paths


def test_push_dry_run_lists_and_uploads_nothing(hub, cluttered, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)  # no token needed
    r = CliRunner().invoke(main, ["push", str(cluttered), "--repo-id", "bob/clean", "--dry-run"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"would upload {len(ALLOWED_UPLOAD)} files of {cluttered} to bob/clean")
    listed = {line.split()[0] for line in lines[1:1 + len(ALLOWED_UPLOAD)]}
    assert listed == ALLOWED_UPLOAD and not lines[1 + len(ALLOWED_UPLOAD)].startswith("  ")
    skipped = next(line for line in r.stdout.splitlines() if line.startswith("not uploaded:"))
    for name in (".env", "secrets/key.txt", "notes.txt", "linked.safetensors (symlink out of the folder)",
                 "heads_link/ (symlink)"):
        assert name in skipped, (name, skipped)
    assert "--- README.md ---" in r.stdout and "library_name: peft" in r.stdout
    assert not hub.requests  # not one request went out
    quiet = CliRunner().invoke(main, ["push", str(cluttered), "--repo-id", "bob/clean", "--dry-run", "--quiet"])
    assert {line.split()[0] for line in quiet.stdout.splitlines()} == ALLOWED_UPLOAD and quiet.stderr == ""


def test_the_token_never_shows_in_errors(hub, merged_adapter, monkeypatch, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_and_secret")
    r = CliRunner().invoke(main, ["push", str(merged_adapter), "--repo-id", "bob/merged"])
    assert r.exit_code == 2 and "refused the token" in r.output
    assert "hf_wrong_and_secret" not in r.output and "hf_wrong_and_secret" not in caplog.text


@pytest.mark.parametrize("repo, revision", [("user/name@../../etc", None), ("bob/x", "../../x"), ("bob/x", "-rf"),
                                            ("bob/x", "a/.hidden"), ("bob/x", "main.lock")])
def test_repo_ids_and_branches_that_climb_are_refused(repo, revision, merged_adapter):
    from peftmerge.hub.push import plan_push

    with pytest.raises(PeftmergeError, match="not a Hub repo id|not a branch name"):
        plan_push(merged_adapter, repo, revision=revision)


def test_scrub_replaces_local_paths_only():
    assert scrub({"path": "/home/u/adapters/sst2", "source": "bob/sst2", "url": "https://hf.co/a/b",
                  "note": "merged /data/x and ./rel", "n": 3}) == {
        "path": "sst2", "source": "bob/sst2", "url": "https://hf.co/a/b", "note": "merged x and ./rel", "n": 3}
    cached = "/root/.cache/huggingface/hub/models--org--tiny/snapshots/abc123/adapter"
    assert scrub(cached) == "org/tiny"


def test_a_local_base_path_in_an_older_cards_metadata_is_dropped(merged_adapter, tmp_path):
    import shutil

    from peftmerge.hub.push import plan_push

    folder = tmp_path / "older"
    shutil.copytree(merged_adapter, folder)
    card = (folder / "README.md").read_text()
    head, body = card.split("---\n", 2)[1:]
    head = "\n".join(f"base_model: {tmp_path}/models/llama" if line.startswith("base_model:") else line
                     for line in head.splitlines())
    (folder / "README.md").write_text(f"---\n{head}\n---\n{body}")
    assert f"base_model: {tmp_path}" in (folder / "README.md").read_text()
    uploaded = ModelCard(plan_push(folder, "bob/older").card)
    assert uploaded.data.base_model is None and getattr(uploaded.data, "base_model_relation", None) is None
    assert "peftmerge" in uploaded.data.tags and str(tmp_path) not in str(uploaded)
