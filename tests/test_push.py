"""Pushing a folder to a fake hub on 127.0.0.1: what arrives, what is forwarded, and clean failures.

The fake hub speaks the part of the hub's HTTP API that ``create_repo`` + ``create_commit`` use
(repo creation, revision lookup and branch creation, README metadata validation, preupload, the LFS
batch API with a basic PUT upload, and the NDJSON commit); it knows huggingface_hub 0.34 to 2.x. Xet is disabled so that the LFS path is taken.
One push runs ``tools/push.py`` in a subprocess configured only by environment variables; the
others call the tool's ``main`` in-process with huggingface_hub's constants pointed at the fake hub.
A cluttered folder (symlinks out of it, a ``.env``, a 3 GB sparse file, sub-folders) checks that only the model
files are listed and committed, and that the folder itself is never written to (listing and mtimes). The fake
hub refuses files over ``MAX_UPLOAD`` bytes, so that a push that would send the big file fails at once.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import huggingface_hub.constants
import pytest
import safetensors.torch
import torch

from sinder_hub.cli import run_command
from sinder_hub.hub import PushError, push_folder

ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "alice/vit-small-sinder"
LFS_SUFFIXES = (".safetensors", ".png")
MAX_UPLOAD = 2**20  # bytes per file
SECRET = "hf_secret_of_the_user"
UPLOADED = ["README.md", "before_after_astronaut.png", "config.json", "model.safetensors", "repair_report.json"]
CLUTTER_LEFT_OUT = [
    (".env", "not a model file"),
    ("before_after_cat.png", "symlink out of the folder"),
    ("checkpoint/", "sub-folder"),
    ("imagenet_train.tar", "not a model file"),
    ("token", "symlink out of the folder"),
    ("weights/", "sub-folder"),
]
OLD = 1_000_000_000  # the mtime every entry gets before a push, so that any write shows


class FakeHub(http.server.ThreadingHTTPServer):
    """A hub on a free local port that records every request and what each commit contained."""

    daemon_threads = True

    def __init__(self, commit_status: int = 200):
        super().__init__(("127.0.0.1", 0), FakeHubHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.commit_status = commit_status
        self.requests: list[dict] = []  # method, path, query, authorization
        self.created: list[dict] = []  # /api/repos/create payloads
        self.branches: list[tuple[str, str]] = []
        self.blobs: dict[str, bytes] = {}  # LFS uploads by sha256
        self.commits: list[dict] = []  # repo, revision, query, summary, files {path: bytes}, lfs {path: oid}
        self.unexpected: list[str] = []
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=5)


class FakeHubHandler(http.server.BaseHTTPRequestHandler):
    timeout = 10  # bounds every read from a client

    def log_message(self, *args):  # keep the test output quiet
        pass

    def do_GET(self):
        self._handle()

    def do_POST(self):
        self._handle()

    def do_PUT(self):
        self._handle()

    def _handle(self):
        hub: FakeHub = self.server
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        hub.requests.append(
            {"method": self.command, "path": path, "query": query, "authorization": self.headers.get("Authorization")}
        )
        body = self._body()
        repo = r"(?P<repo>[^/]+/[^/]+)"
        if self.command == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            hub.created.append(payload)
            return self._json(200, {"url": f"{hub.url}/{payload['organization']}/{payload['name']}"})
        if path == "/api/agent-harnesses":  # recent clients' best-effort agent detection, not part of a push
            return self._json(404, {"error": "not in the fake hub"})
        if self.command == "POST" and path == "/api/validate-yaml":
            return self._json(200, {"errors": [], "warnings": []})
        if match := re.fullmatch(rf"/api/models/{repo}/revision/(?P<rev>.+)", path):
            if match["rev"] == "main" or (match["repo"], match["rev"]) in hub.branches:
                return self._json(200, {"id": match["repo"], "sha": "c" * 40, "xetEnabled": False})
            return self._json(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
        if self.command == "POST" and (match := re.fullmatch(rf"/api/models/{repo}/branch/(?P<rev>.+)", path)):
            hub.branches.append((match["repo"], match["rev"]))
            return self._json(200, {})
        if self.command == "POST" and re.fullmatch(rf"/api/models/{repo}/preupload/.+", path):
            too_big = [f["path"] for f in json.loads(body)["files"] if f["size"] > MAX_UPLOAD]
            if too_big:  # a push that sends a huge file fails at once instead of filling the memory
                hub.unexpected.append(f"upload of {too_big}")
                return self._json(413, {"error": f"the fake hub takes no file over {MAX_UPLOAD} bytes: {too_big}"})
            files = [
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                    "shouldIgnore": False,
                }
                for f in json.loads(body)["files"]
            ]
            return self._json(200, {"files": files})
        if self.command == "POST" and re.fullmatch(rf"/{repo}\.git/info/lfs/objects/batch", path):
            objects = [
                {
                    "oid": o["oid"],
                    "size": o["size"],
                    "authenticated": True,
                    "actions": {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"}},
                }
                for o in json.loads(body)["objects"]
            ]
            return self._json(200, {"transfer": "basic", "objects": objects})
        if self.command == "PUT" and (match := re.fullmatch(r"/lfs-upload/(?P<oid>[0-9a-f]{64})", path)):
            hub.blobs[match["oid"]] = body
            return self._json(200, {})
        if self.command == "POST" and (match := re.fullmatch(rf"/api/models/{repo}/commit/(?P<rev>.+)", path)):
            if hub.commit_status != 200:
                return self._json(hub.commit_status, {"error": "You don't have the rights to push to this repo"})
            return self._commit(hub, match["repo"], match["rev"], query, body)
        hub.unexpected.append(f"{self.command} {path}")
        return self._json(404, {"error": "not in the fake hub"})

    def _commit(self, hub: FakeHub, repo: str, revision: str, query: dict, body: bytes):
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        files, lfs = {}, {}
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                lfs[value["path"]] = value["oid"]
                files[value["path"]] = hub.blobs[value["oid"]]
        hub.commits.append(
            {
                "repo": repo,
                "revision": revision,
                "query": query,
                "summary": lines[0]["value"]["summary"],
                "files": files,
                "lfs": lfs,
            }
        )
        pr = "1" in query.get("create_pr", [])
        return self._json(
            200,
            {
                "commitUrl": f"{hub.url}/{repo}/commit/{'c' * 40}",
                "commitOid": "c" * 40,
                "pullRequestUrl": f"{hub.url}/{repo}/discussions/1" if pr else None,
            },
        )

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _json(self, status: int, payload: dict, headers: dict | None = None):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def token():
    return f"hf_dummy{secrets.token_hex(12)}"


@pytest.fixture
def folder(tmp_path):
    """A repair run folder: timm config + weights + report + picture, and a checkpoint that stays local."""
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "config.json").write_text(
        json.dumps({"architecture": "vit_small_patch14_dinov2", "num_classes": 0, "model_args": {"img_size": 224}})
    )
    safetensors.torch.save_file({"weight": torch.rand(732)}, run / "model.safetensors")  # a valid file of 3,000 bytes
    (run / "repair_report.json").write_text(json.dumps({"source_model": "planted-swiglu", "steps": 12}))
    (run / "before_after_astronaut.png").write_bytes(os.urandom(500))
    (run / "checkpoint" / "state.pt").write_bytes(b"optimiser state")
    return run


@pytest.fixture
def hub_env(monkeypatch, tmp_path, token):
    """Point this process's huggingface_hub at a fake hub (set per test) with a dummy token."""
    for name in [n for n in os.environ if n.startswith(("HF_", "HUGGING"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def use(hub_url: str):
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub_url)

    return use


@pytest.fixture
def cluttered(folder, tmp_path):
    """The run folder with what a real one may hold besides the model: symlinks to a token file and to a picture
    outside it, a .env, a 3 GB sparse file, and its weights as a symlink into a sub-folder of its own."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "token").write_text(SECRET)
    (home / "cat.png").write_bytes(b"a picture from elsewhere")
    (folder / "token").symlink_to(home / "token")
    (folder / "before_after_cat.png").symlink_to(home / "cat.png")
    (folder / ".env").write_text(f"HF_TOKEN={SECRET}\n")
    with open(folder / "imagenet_train.tar", "wb") as big:
        os.truncate(big.fileno(), 3 * 2**30)  # sparse: no disk used, and never read
    (folder / "weights").mkdir()
    (folder / "model.safetensors").rename(folder / "weights" / "model-v2.safetensors")
    (folder / "model.safetensors").symlink_to("weights/model-v2.safetensors")
    return folder


def age(folder: Path) -> None:
    """Set the mtime of the folder and everything in it (symlinks themselves) to ``OLD``."""
    for path in [*folder.rglob("*"), folder]:
        os.utime(path, (OLD, OLD), follow_symlinks=False)


def listing(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under ``folder`` (symlinks not followed) with its mode, size and mtime; the folder as "."."""
    stats = {path.relative_to(folder).as_posix(): path.lstat() for path in [folder, *folder.rglob("*")]}
    return {name: (stat.st_mode, stat.st_size, stat.st_mtime_ns) for name, stat in stats.items()}


@pytest.fixture
def read_only(folder):
    """The run folder without write permission (restored afterwards so that it can be removed)."""
    paths = [*folder.rglob("*"), folder]
    modes = {path: path.stat().st_mode for path in paths}
    for path in paths:
        path.chmod(modes[path] & ~0o222)
    yield folder
    for path in paths:
        path.chmod(modes[path])


def local_files(folder: Path, *names: str) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in names}


def all_bearer(hub: FakeHub, token: str) -> bool:
    """Every hub API request carried the token as a Bearer header (the LFS PUT goes to storage, without it)."""
    api = [r for r in hub.requests if not r["path"].startswith("/lfs-upload/")]
    return bool(api) and all(r["authorization"] == f"Bearer {token}" for r in api)


def run_tool(capfd, *args: str) -> tuple[int, str, str]:
    code = run_command("push", [str(arg) for arg in args])
    out, err = capfd.readouterr()
    return code, out, err


def failure_line(err: str) -> str:
    """The tool's one-line error: the last line of stderr (upload progress bars may come before it)."""
    lines = err.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:]
    return lines[-1]


@pytest.mark.slow
def test_push_in_a_subprocess_sends_the_model_files_with_the_token(folder, tmp_path, token):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(
        HF_TOKEN=token,
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=str(ROOT),
    )
    card = push_folder(folder, REPO_ID, dry_run=True).card
    with FakeHub() as hub:
        env["HF_ENDPOINT"] = hub.url
        result = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "push.py"), str(folder), "--repo-id", REPO_ID, "--private"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    leaked = token in result.stdout + result.stderr
    assert not leaked, "the token appeared in the tool's output"
    assert result.returncode == 0, result.stderr
    assert hub.unexpected == []
    assert all_bearer(hub, token), "a hub request lacked the Bearer token"
    [created] = hub.created
    assert (created["organization"], created["name"]) == ("alice", "vit-small-sinder")
    assert created.get("private") is True or created.get("visibility") == "private"
    [commit] = hub.commits
    assert commit["repo"] == REPO_ID and commit["revision"] == "main" and "create_pr" not in commit["query"]
    assert commit["files"] == {"README.md": card.encode(), **local_files(folder, *UPLOADED[1:])}
    assert sorted(commit["lfs"]) == ["before_after_astronaut.png", "model.safetensors"]
    assert commit["lfs"]["model.safetensors"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert b"library_name: timm" in commit["files"]["README.md"]
    assert "left out 1 (not uploaded):\n  checkpoint/  sub-folder\n" in result.stdout
    assert f"{hub.url}/{REPO_ID}/commit/" in result.stdout
    assert not (folder / "README.md").exists()


def test_revision_is_created_and_committed_to(folder, hub_env, capfd, token):
    with FakeHub() as hub:
        hub_env(hub.url)
        code, out, err = run_tool(capfd, folder, "--repo-id", REPO_ID, "--revision", "sinder-v1")
    assert code == 0, err
    assert hub.unexpected == []
    assert hub.branches == [(REPO_ID, "sinder-v1")]
    [commit] = hub.commits
    assert commit["revision"] == "sinder-v1" and "create_pr" not in commit["query"]
    assert hub.created[0].get("private") in (None, False) and hub.created[0].get("visibility") in (None, "public")
    leaked = token in out + err
    assert not leaked, "the token appeared in the tool's output"


def test_create_pr_is_forwarded(folder, hub_env, capfd, token):
    with FakeHub() as hub:
        hub_env(hub.url)
        code, out, err = run_tool(capfd, folder, "--repo-id", REPO_ID, "--create-pr", "--commit-message", "Repaired")
    assert code == 0, err
    [commit] = hub.commits
    assert commit["query"]["create_pr"] == ["1"] and commit["summary"] == "Repaired"
    preuploads = [r for r in hub.requests if "/preupload/" in r["path"]]
    assert preuploads and all(r["query"].get("create_pr") == ["1"] for r in preuploads)
    assert hub.branches == []
    assert f"{hub.url}/{REPO_ID}/discussions/1" in out
    assert all_bearer(hub, token), "a hub request lacked the Bearer token"


def test_refused_commit_leaves_the_folder_intact(folder, hub_env, capfd, token):
    age(folder)
    before = listing(folder)
    with FakeHub(commit_status=403) as hub:
        hub_env(hub.url)
        code, out, err = run_tool(capfd, folder, "--repo-id", REPO_ID)
    assert code == 1
    line = failure_line(err)
    assert "HTTP 403" in line and "don't have the rights" in line and REPO_ID in line
    assert listing(folder) == before
    leaked = token in out + err
    assert not leaked, "the token appeared in the tool's output"


def test_unreachable_hub_leaves_the_folder_intact(folder, hub_env, capfd):
    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        hub_env(f"http://127.0.0.1:{sock.getsockname()[1]}")
    age(folder)
    before = listing(folder)
    code, out, err = run_tool(capfd, folder, "--repo-id", REPO_ID)
    assert code == 1
    line = failure_line(err)
    assert "could not reach the hub" in line
    assert listing(folder) == before


def test_missing_token_is_reported_before_any_request(folder, hub_env, capfd, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    age(folder)
    before = listing(folder)
    with FakeHub() as hub:
        hub_env(hub.url)
        code, out, err = run_tool(capfd, folder, "--repo-id", REPO_ID)
    assert code == 1 and hub.requests == []
    assert err.strip() == "error: no Hugging Face token: set HF_TOKEN or run `hf auth login` (nothing was uploaded)"
    assert listing(folder) == before


def test_dry_run_lists_exactly_the_files_and_prints_the_card(folder, capfd):
    (folder / "checkpoint" / "state.pt").unlink()
    (folder / "checkpoint").rmdir()
    age(folder)
    before = listing(folder)
    code, out, err = run_tool(capfd, folder, "--repo-id", REPO_ID, "--dry-run")
    assert code == 0, err
    listed = re.findall(r"^\s*([\d,]+)  (\S+)", out, flags=re.M)
    result = push_folder(folder, REPO_ID, dry_run=True)
    assert [name for _, name in listed] == [name for name, _ in result.files] == UPLOADED
    assert "left out" not in out and result.left_out == []
    sizes = dict(result.files)
    assert sizes["README.md"] == len(result.card.encode())
    assert sizes["model.safetensors"] == 3000 and ("3,000", "model.safetensors") in listed
    assert "library_name: timm" in out and f'timm.create_model("hf-hub:{REPO_ID}"' in out
    assert listing(folder) == before


def test_dry_run_lists_the_model_files_then_what_is_left_out_and_why(cluttered, capfd):
    age(cluttered)
    before = listing(cluttered)
    code, out, err = run_tool(capfd, cluttered, "--repo-id", REPO_ID, "--dry-run")
    assert code == 0, err
    files, card = out.split("\n--- README.md ---\n")
    lines = files.splitlines()
    assert lines[0] == f"dry run: would upload 5 files from {cluttered} to {REPO_ID}"
    assert [line.split()[1] for line in lines[1:6]] == UPLOADED
    assert lines[1].endswith("README.md  (model card, generated: not written to the folder)")
    assert lines[6] == f"left out {len(CLUTTER_LEFT_OUT)} (not uploaded):"
    assert [tuple(line.split(None, 1)) for line in lines[7:]] == CLUTTER_LEFT_OUT
    assert len({line.index(reason) for line, (_, reason) in zip(lines[7:], CLUTTER_LEFT_OUT)}) == 1  # one column
    result = push_folder(cluttered, REPO_ID, dry_run=True)
    assert result.left_out == CLUTTER_LEFT_OUT
    assert dict(result.files)["model.safetensors"] == 3000  # the size of the file the symlink points to
    assert "before_after_astronaut.png" in card and "before_after_cat" not in card and SECRET not in card
    assert listing(cluttered) == before


def test_push_commits_exactly_the_model_files(cluttered, hub_env, capfd, token):
    age(cluttered)
    before = listing(cluttered)
    card = push_folder(cluttered, REPO_ID, dry_run=True).card
    with FakeHub() as hub:
        hub_env(hub.url)
        code, out, err = run_tool(capfd, cluttered, "--repo-id", REPO_ID)
    assert code == 0, err
    assert hub.unexpected == []
    [commit] = hub.commits
    weights = (cluttered / "weights" / "model-v2.safetensors").read_bytes()
    picture = (cluttered / "before_after_astronaut.png").read_bytes()
    assert commit["files"] == {
        "README.md": card.encode(),
        "before_after_astronaut.png": picture,
        "config.json": (cluttered / "config.json").read_bytes(),
        "model.safetensors": weights,
        "repair_report.json": (cluttered / "repair_report.json").read_bytes(),
    }
    assert set(hub.blobs) == {hashlib.sha256(data).hexdigest() for data in (weights, picture)}  # nothing else sent
    lines = out.splitlines()
    assert lines[0] == f"pushed 5 files from {cluttered} to {REPO_ID}"
    assert lines[1] == f"left out {len(CLUTTER_LEFT_OUT)} (not uploaded):"
    assert [tuple(line.split(None, 1)) for line in lines[2:-1]] == CLUTTER_LEFT_OUT
    assert lines[-1].startswith(f"{hub.url}/{REPO_ID}/commit/")
    assert SECRET not in out + err and token not in out + err
    assert listing(cluttered) == before


def test_read_only_folder_pushes_and_stays_unchanged(read_only, hub_env, capfd):
    age(read_only)
    before = listing(read_only)
    with FakeHub() as hub:
        hub_env(hub.url)
        code, out, err = run_tool(capfd, read_only, "--repo-id", REPO_ID)
    assert code == 0, err
    [commit] = hub.commits
    assert sorted(commit["files"]) == UPLOADED
    assert b"library_name: timm" in commit["files"]["README.md"]
    assert listing(read_only) == before


def test_the_folders_own_card_is_uploaded_as_it_is(folder, hub_env, capfd):
    card = "---\nlicense: mit\n---\n# my own card\n"
    (folder / "README.md").write_text(card)
    code, out, err = run_tool(capfd, folder, "--repo-id", REPO_ID, "--dry-run")
    assert code == 0, err
    assert f"\n{len(card):>14}  README.md\n" in out and out.endswith(f"--- README.md ---\n{card}\n")
    with FakeHub() as hub:
        hub_env(hub.url)
        code, out, err = run_tool(capfd, folder, "--repo-id", REPO_ID)
    assert code == 0, err
    [commit] = hub.commits
    assert commit["files"] == local_files(folder, *UPLOADED)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_required_file_symlinked_from_outside_is_refused(folder, tmp_path, hub_env, capfd, name):
    (folder / name).rename(tmp_path / name)
    (folder / name).symlink_to(tmp_path / name)
    expected = f"error: {folder} cannot be pushed: {name} is left out (symlink out of the folder)"
    code, out, err = run_tool(capfd, folder, "--repo-id", REPO_ID, "--dry-run")
    assert (code, out, err.strip()) == (2, "", expected)
    with FakeHub() as hub:
        hub_env(hub.url)
        code, out, err = run_tool(capfd, folder, "--repo-id", REPO_ID)
    assert (code, out, err.strip(), hub.requests) == (2, "", expected, [])


def test_an_invalid_report_is_named_by_its_place_in_the_folder(folder, capfd):
    (folder / "repair_report.json").write_text("{oops")
    code, out, err = run_tool(capfd, folder, "--repo-id", REPO_ID, "--dry-run")
    assert code == 2 and err.startswith(f"error: {folder / 'repair_report.json'}: invalid JSON at line 1 column 2")


@pytest.mark.parametrize("with_safetensors", [False, True])
def test_pickled_weights_are_uploaded_only_when_they_are_the_weights(folder, with_safetensors):
    (folder / "pytorch_model.bin").write_bytes(b"pickled weights")
    if not with_safetensors:
        (folder / "model.safetensors").unlink()
    result = push_folder(folder, REPO_ID, dry_run=True)
    uploaded = [name for name, _ in result.files]
    assert ("model.safetensors" in uploaded, "pytorch_model.bin" in uploaded) == (
        with_safetensors,
        not with_safetensors,
    )
    duplicate = ("pytorch_model.bin", "duplicate weights: the .safetensors ones are uploaded")
    assert (duplicate in result.left_out) == with_safetensors


@pytest.mark.parametrize(
    ("remove", "missing"),
    [
        ("config.json", "it has no config.json"),
        ("model.safetensors", "it has no weights file"),
    ],
)
def test_incomplete_folder_is_refused(folder, remove, missing):
    (folder / remove).unlink()
    with pytest.raises(PushError, match=f"cannot be pushed: {missing}"):
        push_folder(folder, REPO_ID, dry_run=True)
