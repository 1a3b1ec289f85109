"""A Hugging Face hub on 127.0.0.1 for tests (point `HF_ENDPOINT` at `url`): the few endpoints
that `huggingface_hub` and `datasets` call to download a file or load a data set.

- HEAD/GET `/{repo}/resolve/{rev}/{path}` (models) and `/datasets/{repo}/resolve/{rev}/{path}`,
  with the headers `hf_hub_download` reads (X-Repo-Commit, ETag, Content-Length) and Range reads;
- GET `/api/{models,datasets}/{repo}[/revision/{rev}]`, the repo's info;
- GET `/api/{kind}/{repo}/tree/{rev}[/{path}]` and POST `/api/{kind}/{repo}/paths-info/{rev}`.

A missing repo or file answers 404 with the hub's X-Error-Code. Every request is recorded.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from fake_openai import running


class Repo:
    """One repo at one commit: files given as bytes or as a path on disk (served as stored)."""

    def __init__(self, files: dict[str, bytes | Path]):
        self.files = files
        digest = hashlib.sha1()
        for name in sorted(files):
            digest.update(name.encode() + self.oid(name).encode())
        self.sha = digest.hexdigest()

    def data(self, name: str) -> bytes:
        f = self.files[name]
        return f.read_bytes() if isinstance(f, Path) else f

    def size(self, name: str) -> int:
        f = self.files[name]
        return f.stat().st_size if isinstance(f, Path) else len(f)

    def oid(self, name: str) -> str:
        f = self.files[name]
        return hashlib.sha1(f"{f}:{self.size(name)}".encode() if isinstance(f, Path) else f).hexdigest()

    def entry(self, name: str) -> dict:
        return {"type": "file", "path": name, "size": self.size(name), "oid": self.oid(name)}

    def folders(self) -> set[str]:
        return {"/".join(n.split("/")[:i]) for n in self.files for i in range(1, n.count("/") + 1)}

    def listing(self, under: str, recursive: bool) -> list[dict]:
        prefix = f"{under}/" if under else ""
        out = []
        for name in sorted(self.files):
            rest = name[len(prefix):] if name.startswith(prefix) else None
            if rest is not None and (recursive or "/" not in rest):
                out.append(self.entry(name))
        for folder in sorted(self.folders()):
            rest = folder[len(prefix):] if folder.startswith(prefix) else None
            if rest and (recursive or "/" not in rest):
                out.append({"type": "directory", "path": folder, "oid": hashlib.sha1(folder.encode()).hexdigest()})
        return out


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, models: dict[str, Repo], datasets: dict[str, Repo]):
        super().__init__(("127.0.0.1", 0), Handler)
        self.repos = {"models": models, "datasets": datasets}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


RESOLVE = re.compile(r"^/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
API = re.compile(r"^/api/(models|datasets)/([^/]+/[^/]+)(?:/(revision|tree|paths-info)/([^/]+)(?:/(.*))?)?$")


class Handler(BaseHTTPRequestHandler):
    server: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        form = parse_qs(self.rfile.read(length).decode())
        self._route(body=True, form=form)

    def _route(self, body: bool, form: dict | None = None) -> None:
        url = urlparse(self.path)
        path = unquote(url.path)
        with self.server.lock:
            self.server.requests.append((self.command, self.path))
        if m := RESOLVE.match(path):
            kind = "datasets" if m.group(1) else "models"
            return self._resolve(kind, m.group(2), m.group(4), body)
        if m := API.match(path):
            kind, repo_id, action, _rev, sub = m.groups()
            repo = self.server.repos[kind].get(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound")
            if action in (None, "revision"):
                siblings = [{"rfilename": n} for n in sorted(repo.files)]
                return self._json({"id": repo_id, "sha": repo.sha, "private": False, "siblings": siblings})
            if action == "tree":
                query = parse_qs(url.query)
                return self._json(repo.listing(sub or "", query.get("recursive", ["False"])[0].lower() == "true"))
            wanted = (form or {}).get("paths", [])
            found = [repo.entry(p) for p in wanted if p in repo.files]
            found += [{"type": "directory", "path": p, "oid": hashlib.sha1(p.encode()).hexdigest()}
                      for p in wanted if p in repo.folders()]
            return self._json(found)
        self._error(404, "RepoNotFound")

    def _resolve(self, kind: str, repo_id: str, name: str, body: bool) -> None:
        repo = self.server.repos[kind].get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound")
        if name not in repo.files:
            return self._error(404, "EntryNotFound", {"X-Repo-Commit": repo.sha})
        status, headers = 200, {"X-Repo-Commit": repo.sha, "ETag": f'"{repo.oid(name)}"',
                                "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if not body:
            return self._send(status, b"", headers, length=repo.size(name))
        data = repo.data(name)
        if rng := re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", "")):
            start, end = int(rng.group(1)), min(int(rng.group(2) or len(data) - 1), len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        self._send(status, data, headers)

    def _error(self, status: int, code: str, headers: dict | None = None) -> None:
        self._send(status, json.dumps({"error": code}).encode(),
                   {"X-Error-Code": code, "Content-Type": "application/json", **(headers or {})})

    def _json(self, obj) -> None:
        self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def _send(self, status: int, data: bytes, headers: dict, length: int | None = None) -> None:
        try:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data) if length is None else length))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass


def serve(models: dict[str, Repo], datasets: dict[str, Repo]):
    """A running fake hub (a context manager), shut down on exit."""
    return running(FakeHub(models, datasets))
