"""Hub ids as inputs: resolve() through the huggingface_hub cache, offline and against the fake Hub."""

from __future__ import annotations

import hashlib
import json
import socket

import pytest
from fake_hub import FakeHub, point_client_at
from huggingface_hub import constants

from peftmerge.errors import PeftmergeError
from peftmerge.io.hub import describe_input, looks_like_repo_id, resolve, split_ref

SHA = "0123456789abcdef0123456789abcdef01234567"
CONFIG = b'{"r": 4, "peft_type": "LORA"}'
WEIGHTS = b"not really safetensors, but bytes to compare"


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """A temp HF cache holding bob/tiny at commit SHA (refs/main -> SHA), with the network off."""
    cache = tmp_path / "hf-home" / "hub"
    repo = cache / "models--bob--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    snap = repo / "snapshots" / SHA
    snap.mkdir(parents=True)
    (snap / "adapter_config.json").write_bytes(CONFIG)
    (snap / "adapter_model.safetensors").write_bytes(WEIGHTS)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read at import: the env alone is too late
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # never used; nothing may leave anyway
    return snap


@pytest.mark.parametrize("s, ok", [
    ("bob/tiny", True), ("HuggingFaceTB/SmolLM2-135M", True), ("bob/tiny@main", True), ("bob/tiny@" + SHA, True),
    ("bob/tiny@refs/pr/1", True), ("gpt2", False), ("./bob/tiny", False), ("/abs/path", False), ("a/b/c", False),
    ("bob/ti ny", False), ("bob/-tiny", False), ("bob/ti--ny", False), ("bob/tiny.", False), ("bob/", False),
    ("adapters/a.safetensors", True),
])
def test_looks_like_repo_id(s, ok):
    assert looks_like_repo_id(s) is ok


def test_split_ref():
    assert split_ref("bob/tiny@dev") == ("bob/tiny", "dev") and split_ref("bob/tiny") == ("bob/tiny", None)
    with pytest.raises(PeftmergeError, match="is not a Hub repo id"):
        split_ref("no")


def test_local_paths_win(tmp_path, monkeypatch, offline_cache):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bob" / "tiny").mkdir(parents=True)  # a local folder that looks like a repo id
    assert resolve("bob/tiny") == tmp_path.joinpath("bob", "tiny").relative_to(tmp_path)
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"x")
    assert resolve(f) == f and resolve(str(f)) == f
    with pytest.raises(PeftmergeError, match=r"^\./missing/dir: no such file or directory, and not a Hub repo id"):
        resolve("./missing/dir")


def test_offline_from_cache(offline_cache):
    assert resolve("bob/tiny") == offline_cache
    assert resolve(f"bob/tiny@{SHA}") == offline_cache
    assert (resolve("bob/tiny") / "adapter_model.safetensors").read_bytes() == WEIGHTS
    assert describe_input("bob/tiny") == {"source": "bob/tiny", "revision": SHA}
    assert describe_input("bob/tiny", offline_cache / "adapter_config.json")["revision"] == SHA


def test_offline_not_cached(offline_cache):
    with pytest.raises(PeftmergeError, match=r"^bob/other: no such local path, and not in the Hugging Face cache with HF_HUB_OFFLINE=1"):
        resolve("bob/other")
    with pytest.raises(PeftmergeError, match=r"^bob/tiny@dev: no such local path, and not in the Hugging Face cache"):
        resolve("bob/tiny@dev")  # the repo is cached, that branch is not


def test_offline_env_set_after_import(offline_cache, monkeypatch):
    # huggingface_hub read HF_HUB_OFFLINE at import; resolve() also honours it when set later
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert resolve("bob/tiny") == offline_cache
    with pytest.raises(PeftmergeError, match="HF_HUB_OFFLINE=1"):
        resolve("bob/other")


def test_describe_local(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(WEIGHTS)
    (tmp_path / "adapter_config.json").write_bytes(CONFIG)
    assert describe_input(tmp_path) == {"source": str(tmp_path), "sha256": hashlib.sha256(WEIGHTS).hexdigest()}
    assert describe_input(tmp_path / "adapter_config.json")["sha256"] == hashlib.sha256(CONFIG).hexdigest()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with FakeHub({"hf_bob": "bob"}) as h:
        point_client_at(h, monkeypatch, tmp_path)
        h.add_repo("bob/tiny", owner="bob", files={"adapter_config.json": CONFIG, "adapter_model.safetensors": WEIGHTS,
                                                   "README.md": b"# tiny\n"})
        h.add_repo("bob/private", owner="bob", private=True, files={"adapter_config.json": CONFIG})
        yield h


def test_download_through_cache_then_offline(hub, monkeypatch, tmp_path):
    path = resolve("bob/tiny", allow_patterns=["adapter_*"])
    head = hub.repos["bob/tiny"].heads["main"]
    assert path == tmp_path / "hf-cache" / "models--bob--tiny" / "snapshots" / head
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (path / "adapter_model.safetensors").read_bytes() == WEIGHTS
    assert describe_input("bob/tiny", path) == {"source": "bob/tiny", "revision": head}
    # second time, offline: the cache answers
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(hub.requests)
    assert resolve("bob/tiny", allow_patterns=["adapter_*"]) == path and len(hub.requests) == n


def test_repo_and_revision_not_found(hub, monkeypatch):
    with pytest.raises(PeftmergeError, match=r"^bob/nope: not a local path and no such repo on the Hub"):
        resolve("bob/nope")
    with pytest.raises(PeftmergeError, match="no such repo on the Hub"):
        resolve("bob/private")  # no token: private repos look missing, as on the Hub
    with pytest.raises(PeftmergeError, match=r"^bob/tiny@v9: revision 'v9' not found on the Hub"):
        resolve("bob/tiny@v9")
    monkeypatch.setenv("HF_TOKEN", "hf_bob")
    assert json.loads((resolve("bob/private") / "adapter_config.json").read_bytes()) == json.loads(CONFIG)


def test_server_down_not_cached(monkeypatch, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    point_client_at(f"http://127.0.0.1:{port}", monkeypatch, tmp_path)
    with pytest.raises(PeftmergeError, match=r"^bob/tiny: no such local path, and the Hub cannot be reached to download it"):
        resolve("bob/tiny")
