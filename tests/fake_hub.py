"""A tiny fake of the Hugging Face Hub on 127.0.0.1, for tests only (the real Hub is unreachable here).

It implements just the endpoints huggingface_hub 2.x calls to create a repo, push a folder (the
legacy LFS path: run with Xet disabled) and download a snapshot:

    POST /api/repos/create                              create_repo
    GET  /api/models/{repo}[/revision/{rev}]            repo_info
    POST /api/validate-yaml                             README.md metadata check
    POST /api/models/{repo}/branch/{branch}             create_branch
    POST /api/models/{repo}/preupload/{rev}             upload mode per file (regular or lfs)
    POST /{repo}.git/info/lfs/objects/batch             LFS batch: where to PUT each object
    PUT  /lfs-upload/{oid}                              LFS object (checked against its sha256)
    POST /api/models/{repo}/commit/{rev}                ndjson commit
    GET  /api/models/{repo}/tree/{rev}                  list_repo_tree (snapshot_download)
    HEAD/GET /{repo}/resolve/{rev}/{path}               file metadata and content (hf_hub_download)

Users are known by their token (``tokens={"hf_bob": "bob"}``); a user may write only to repos in
their own namespace. Everything that arrived is kept in :attr:`FakeHub.repos` for assertions.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

MAX_BODY = 64 * 1024 * 1024  # bounded: a test never sends more
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_REPO = r"(?P<repo>[^/]+/[^/]+)"


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    owner: str
    private: bool = False
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)
    lfs_paths: set[str] = field(default_factory=set)

    def commit(self, branch: str, message: str, files: dict[str, bytes]) -> str:
        self.branches[branch] = {**self.branches[branch], **files}
        oid = hashlib.sha1(f"{self.heads.get(branch)}{message}{sorted(self.branches[branch])}".encode()).hexdigest()
        self.heads[branch] = oid
        self.commits.append({"branch": branch, "message": message, "files": sorted(files), "oid": oid})
        return oid


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class FakeHub:
    """Start with ``with FakeHub(tokens) as hub:``; ``hub.url`` is the endpoint."""

    def __init__(self, tokens: dict[str, str]):
        self.tokens = dict(tokens)
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add_repo(self, repo_id: str, owner: str, files: dict[str, bytes] | None = None, private: bool = False) -> Repo:
        repo = Repo(owner=owner, private=private)
        repo.commit("main", "initial commit", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
        if files:
            for path, data in files.items():
                if path.endswith(LFS_SUFFIXES):
                    repo.lfs_paths.add(path)
            repo.commit("main", "seed", files)
        self.repos[repo_id] = repo
        return repo

    # -- endpoint logic (called under self.lock) ----------------------------------------------------
    def user(self, headers) -> str | None:
        auth = headers.get("authorization") or ""
        return self.tokens.get(auth[len("Bearer "):]) if auth.startswith("Bearer ") else None

    def readable(self, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and repo.owner != user):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def writable(self, repo_id: str, user: str | None) -> Repo:
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        repo = self.readable(repo_id, user)
        if repo.owner != user:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    @staticmethod
    def branch(repo: Repo, rev: str) -> str:
        rev = unquote(rev)
        if rev not in repo.branches:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return rev

    def resolve_rev(self, repo: Repo, rev: str) -> str:
        """A branch name or a commit oid -> branch name (enough for a fake)."""
        rev = unquote(rev)
        for name, head in repo.heads.items():
            if rev in (name, head):
                return name
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # idle keep-alive connections close on their own
    hub: FakeHub

    def log_message(self, *args) -> None:  # quiet
        pass

    # -- plumbing ------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
                if len(out) > MAX_BODY:
                    raise HubError(413, "body too large")
        n = int(self.headers.get("content-length") or 0)
        if n > MAX_BODY:
            raise HubError(413, "body too large")
        return self.rfile.read(n)

    def _send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None, head=False):
        data = raw if raw is not None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path
        hub = self.hub
        try:
            body = self._body() if method in ("POST", "PUT") else b""
            with hub.lock:
                hub.requests.append((method, path))
                for verb, pattern, fn in _ROUTES:
                    if verb == method and (m := re.fullmatch(pattern, path)):
                        return fn(self, hub, hub.user(self.headers), body, **m.groupdict())
            raise HubError(404, f"no route for {method} {path}")
        except HubError as e:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._send(e.status, {"error": e.message, **e.extra}, headers, head=method == "HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # -- endpoints -------------------------------------------------------------------------------
    def create_repo(self, hub: FakeHub, user, body):
        req = json.loads(body)
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        namespace = req.get("organization") or user
        repo_id = f"{namespace}/{req['name']}"
        if namespace != user:
            raise HubError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        if repo_id in hub.repos:
            raise HubError(409, "You already created this model repo", url=f"{hub.url}/{repo_id}")
        hub.add_repo(repo_id, owner=user, private=req.get("visibility") == "private")
        self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

    def repo_info(self, hub: FakeHub, user, body, repo, rev="main"):
        r = hub.readable(repo, user)
        branch = hub.resolve_rev(r, rev)
        files = r.branches[branch]
        self._send(200, {"id": repo, "author": r.owner, "sha": r.heads[branch], "private": r.private,
                         "siblings": [{"rfilename": p} for p in sorted(files)]})

    def validate_yaml(self, hub: FakeHub, user, body):
        content = json.loads(body)["content"]
        m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        errors = []
        try:
            meta = yaml.safe_load(m.group(1)) if m else {}
        except yaml.YAMLError as e:
            meta, errors = None, [{"message": f"invalid YAML: {e}"}]
        if meta is not None and not isinstance(meta, dict):
            errors.append({"message": "metadata must be a YAML mapping"})
        elif meta:
            if meta.get("base_model_relation") not in (None, "adapter", "merge", "quantized", "finetune"):
                errors.append({"message": f"base_model_relation {meta['base_model_relation']!r} is not allowed"})
            if "tags" in meta and not isinstance(meta["tags"], list):
                errors.append({"message": "tags must be a list"})
        self._send(400 if errors else 200, {"errors": errors, "warnings": []})

    def create_branch(self, hub: FakeHub, user, body, repo, branch):
        r = hub.writable(repo, user)
        branch = unquote(branch)
        if branch in r.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        r.branches[branch] = dict(r.branches["main"])
        r.heads[branch] = r.heads["main"]
        self._send(200, {})

    def preupload(self, hub: FakeHub, user, body, repo, rev):
        r = hub.writable(repo, user)
        hub.branch(r, rev)
        files = json.loads(body)["files"]
        self._send(200, {"files": [
            {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
             "shouldIgnore": False}
            for f in files
        ]})

    def lfs_batch(self, hub: FakeHub, user, body, repo):
        hub.writable(repo, user)
        objects = []
        for o in json.loads(body)["objects"]:
            if o["oid"] in hub.lfs:
                objects.append({"oid": o["oid"], "size": o["size"]})  # already there: no action
            else:
                objects.append({"oid": o["oid"], "size": o["size"],
                                "actions": {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"}}})
        self._send(200, {"transfer": "basic", "objects": objects})

    def lfs_upload(self, hub: FakeHub, user, body, oid):
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "sha256 of the uploaded content does not match the oid")
        hub.lfs[oid] = body
        self._send(200, {})

    def commit(self, hub: FakeHub, user, body, repo, rev):
        r = hub.writable(repo, user)
        branch = hub.branch(r, rev)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        files = {}
        for item in lines:
            v = item["value"]
            if item["key"] == "file":
                files[v["path"]] = base64.b64decode(v["content"])
            elif item["key"] == "lfsFile":
                if v["oid"] not in hub.lfs:
                    raise HubError(422, f"LFS object {v['oid']} for {v['path']} was never uploaded")
                files[v["path"]] = hub.lfs[v["oid"]]
                r.lfs_paths.add(v["path"])
            elif item["key"] != "header":
                raise HubError(400, f"unsupported commit operation {item['key']}")
        oid = r.commit(branch, header["summary"], files)
        self._send(200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None})

    def tree(self, hub: FakeHub, user, body, repo, rev):
        r = hub.readable(repo, user)
        files = r.branches[hub.resolve_rev(r, rev)]
        entries = []
        for p, data in sorted(files.items()):
            e = {"type": "file", "path": p, "size": len(data), "oid": _git_blob_oid(data)}
            if p in r.lfs_paths:
                e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 130}
            entries.append(e)
        self._send(200, entries)

    def resolve_file(self, hub: FakeHub, user, body, repo, rev, path, head=False):
        r = hub.readable(repo, user)
        branch = hub.resolve_rev(r, rev)
        path = unquote(path)
        data = r.branches[branch].get(path)
        if data is None:
            raise HubError(404, "Entry not found", "EntryNotFound")
        etag = hashlib.sha256(data).hexdigest() if path in r.lfs_paths else _git_blob_oid(data)
        headers = {"X-Repo-Commit": r.heads[branch], "ETag": f'"{etag}"'}
        if path in r.lfs_paths:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        self._send(200, headers=headers, raw=data, head=head)

    def resolve_head(self, hub, user, body, repo, rev, path):
        self.resolve_file(hub, user, body, repo, rev, path, head=True)


_ROUTES = [
    ("POST", r"/api/repos/create", _Handler.create_repo),
    ("POST", r"/api/validate-yaml", _Handler.validate_yaml),
    ("GET", rf"/api/models/{_REPO}", _Handler.repo_info),
    ("GET", rf"/api/models/{_REPO}/revision/(?P<rev>[^/]+)", _Handler.repo_info),
    ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)", _Handler.tree),
    ("POST", rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", _Handler.create_branch),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", _Handler.preupload),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", _Handler.commit),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", _Handler.lfs_batch),
    ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", _Handler.lfs_upload),
    ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", _Handler.resolve_file),
    ("HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", _Handler.resolve_head),
]


def point_client_at(hub: FakeHub | str, monkeypatch, tmp_path) -> None:
    """Point huggingface_hub at ``hub`` (a FakeHub or a bare URL) for one test: endpoint, no Xet (the fake
    speaks the LFS protocol), online towards 127.0.0.1 only, a fresh cache, and no saved token."""
    from huggingface_hub import constants

    url = hub if isinstance(hub, str) else hub.url
    # huggingface_hub reads these at import time, so the env alone is not enough.
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
