"""A loopback stand-in for the Hugging Face hub, for tests that must not touch the network.

``HubServer`` serves a local folder (``root/<org>/<repo>/<file>``) the way huggingface.co serves model
repos to ``huggingface_hub.hf_hub_download`` (and so to ``open_clip.create_model('hf-hub:org/repo')``).
What huggingface_hub 2.x needs, from ``file_download.py`` / ``utils/_http.py``:

* ``HEAD {endpoint}/{repo_id}/resolve/{revision}/{filename}`` first (metadata), then ``GET`` of the same
  url (or of the ``Location`` of a redirect) for the bytes. No ``/api/models/...`` call is made.
* The HEAD answer must carry ``X-Repo-Commit`` (else ``FileMetadataError``: "does not seem to be served
  by a Hugging Face Hub endpoint") and an ``ETag`` (or ``X-Linked-Etag``); the size comes from
  ``X-Linked-Size`` or ``Content-Length``, and the GET body must have exactly that many bytes. The file is
  cached under ``blobs/<etag>`` with ``snapshots/<commit>/<filename>`` and ``refs/<revision>``.
* Errors are typed by the ``X-Error-Code`` header: ``EntryNotFound`` (a missing file; clients such as
  open_clip then try the next file name, and the non-existence is cached under ``.no_exist/<commit>``),
  ``RepoNotFound``, ``RevisionNotFound``. Connection errors and 5xx make the client fall back to the
  cache; ``EntryNotFound`` / ``RevisionNotFound`` do not.
* An LFS file on the real hub answers the HEAD with a 302 to a CDN host plus ``X-Linked-Etag`` and
  ``X-Linked-Size``; the client does not follow a redirect to another host for the HEAD and downloads
  from the ``Location``. ``HubServer(lfs_redirect=True)`` mimics that, using ``localhost`` as the "CDN"
  host (another origin than ``127.0.0.1``).

The ``hf_hub`` fixture starts a server on a free port of 127.0.0.1, points ``huggingface_hub`` at it (the
endpoint is read from ``HF_ENDPOINT`` at import time, so the derived constants are patched), turns
offline mode off for the test, gives it an empty hub cache under ``tmp_path`` and stops the server after
the test. Import it in a test module with ``from hub_server import hf_hub``.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote, urlsplit

import pytest

_RESOLVE = re.compile(r"^/(?:(?P<type>models|datasets|spaces)/)?(?P<repo>.+?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_BLOB = re.compile(r"^/blobs/(?P<repo>.+)/(?P<rev>[0-9a-f]{40})/(?P<file>.+)$")
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz", ".onnx")


@dataclass(frozen=True)
class Request:
    """One request the server saw."""

    method: str
    path: str
    headers: dict[str, str]  # names in lower case


class HubServer:
    """Serve ``root/<repo_id>/<filename>`` as hub model repos on a loopback port.

    Args:
        root: folder holding one sub-folder per repo id (``org/name``).
        lfs_redirect: answer weight files (``.safetensors``, ``.bin``...) like LFS files on the hub: a 302 to
            ``http://localhost:<port>/blobs/...`` with ``X-Linked-Etag`` / ``X-Linked-Size``.
        fail_status: answer every request with this HTTP status (e.g. 503: hub down) instead.
    """

    def __init__(self, root: str | Path, lfs_redirect: bool = False, fail_status: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lfs_redirect = lfs_redirect
        self.fail_status = fail_status
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    # -- repo content ---------------------------------------------------------------------------------
    def add_file(self, repo_id: str, filename: str, data: bytes | str | Path) -> Path:
        """Put a file in a repo (``data``: bytes, text, or a path to copy)."""
        target = self.root / repo_id / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, Path):
            shutil.copyfile(data, target)
        elif isinstance(data, str):
            target.write_text(data, encoding="utf-8")
        else:
            target.write_bytes(data)
        return target

    def commit(self, repo_id: str) -> str:
        """The repo's commit hash: a digest of its files, so it changes when they change."""
        digest = hashlib.sha1(repo_id.encode())
        base = self.root / repo_id
        for path in sorted(p for p in base.rglob("*") if p.is_file()):
            digest.update(path.relative_to(base).as_posix().encode() + b"\0" + _sha256(path).encode())
        return digest.hexdigest()

    # -- lifecycle --------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("HubServer is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def start(self) -> HubServer:
        if self._httpd is not None:
            return self
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        # Reuse the port of an earlier start so that a restarted server keeps the endpoint the client knows.
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port or 0), handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; the port is closed (connections are refused) until ``start`` again."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what was asked -----------------------------------------------------------------------------------
    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def seen(self, method: str | None = None) -> list[str]:
        """Paths requested so far (optionally only one method's), in order."""
        with self._lock:
            return [r.path for r in self.requests if method is None or r.method == method]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so a stopped server really is gone (no kept-alive sockets).
    protocol_version = "HTTP/1.0"
    hub: HubServer

    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr log
        pass

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _send(self, status: int, headers: dict[str, str], data: bytes = b"", body: bool = True) -> None:
        self.send_response(status)
        headers = {"Content-Length": str(len(data)), **headers}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if body and data:
            self.wfile.write(data)

    def _error(self, status: int, code: str | None, message: str, body: bool, commit: str | None = None):
        headers = {"Content-Type": "application/json"}
        if code:
            headers["X-Error-Code"] = code
        headers["X-Error-Message"] = message
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(status, headers, json.dumps({"error": message}).encode(), body)

    def _answer(self, body: bool) -> None:
        hub = self.hub
        path = unquote(urlsplit(self.path).path)
        hub._record(Request(self.command, path, {k.lower(): v for k, v in self.headers.items()}))
        if hub.fail_status is not None:
            return self._error(hub.fail_status, None, "hub unavailable", body)

        blob = _BLOB.match(path)
        match = blob or _RESOLVE.match(path)
        if match is None or (not blob and match.group("type") not in (None, "models")):
            return self._error(404, None, "not found", body)
        repo_id, revision, filename = match.group("repo"), match.group("rev"), match.group("file")
        repo_dir = (hub.root / repo_id).resolve()
        if hub.root.resolve() not in repo_dir.parents or not repo_dir.is_dir():
            # The hub answers 401 for a repo that does not exist (or that the caller may not see).
            return self._error(401, "RepoNotFound", "Repository not found", body)
        commit = hub.commit(repo_id)
        if revision not in ("main", commit):
            return self._error(404, "RevisionNotFound", "Invalid rev id: " + revision, body)
        file = (repo_dir / filename).resolve()
        if repo_dir not in file.parents or not file.is_file():
            return self._error(404, "EntryNotFound", "Entry not found", body, commit)

        data = file.read_bytes()
        etag = hashlib.sha256(data).hexdigest()
        headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if not blob and hub.lfs_redirect and filename.endswith(_LFS_SUFFIXES):
            headers.update(
                {
                    "Location": f"http://localhost:{hub.port}/blobs/{repo_id}/{commit}/{filename}",
                    "X-Linked-Etag": f'"{etag}"',
                    "X-Linked-Size": str(len(data)),
                }
            )
            return self._send(302, headers, b"", body)
        headers["Content-Type"] = "application/octet-stream"
        status, data = _apply_range(self.headers.get("Range"), data, headers)
        self._send(status, headers, data, body)


def _apply_range(range_header: str | None, data: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    """``Range: bytes=a-b`` support (the client resumes interrupted downloads with it)."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header or "")
    if not match or not any(match.groups()):
        return 200, data
    total = len(data)
    if match.group(1):
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) else total - 1
    else:  # suffix range: the last n bytes
        start, end = max(total - int(match.group(2)), 0), total - 1
    end = min(end, total - 1)
    if start >= total or start > end:
        headers["Content-Range"] = f"bytes */{total}"
        return 416, b""
    headers["Content-Range"] = f"bytes {start}-{end}/{total}"
    return 206, data[start : end + 1]


def point_hub_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, cache_dir: str | Path) -> None:
    """Make ``huggingface_hub`` use ``endpoint`` and an own cache, online, for the rest of the test."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    endpoint = endpoint.rstrip("/")
    cache_dir = str(cache_dir)
    host = urlsplit(endpoint).hostname or ""
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    # The environment, for anything that reads it later (subprocesses, a fresh import).
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", cache_dir)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    # The constants huggingface_hub derived from it at import time.
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_URL_HOSTS", frozenset(constants.HF_URL_HOSTS | {host}))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache_dir)
    monkeypatch.setattr(constants, "HUGGINGFACE_HUB_CACHE", cache_dir)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(_http, "_HUB_ORIGINS", frozenset(_http._HUB_ORIGINS | {_http._url_origin(endpoint)}))
    try:
        from huggingface_hub.utils import _cache_manager

        monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", cache_dir)
    except (ImportError, AttributeError):
        pass
    # Online, the first request would fetch {endpoint}/api/agent-harnesses (user-agent detection) and
    # write it under HF_HOME: keep that out of the server's log and of the user's home.
    if hasattr(constants, "AGENT_HARNESSES_PATH"):
        harnesses = str(Path(cache_dir).parent / "agent_harnesses.json")
        monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", harnesses)
    try:
        from huggingface_hub.utils import _detect_agent

        monkeypatch.setattr(_detect_agent, "_registry", dict(_detect_agent._EMPTY_REGISTRY))
    except (ImportError, AttributeError):
        pass


def skip_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip huggingface_hub's retry waits (1+2+4+8+8 s per file it can neither reach nor find in the cache),
    only in its http module."""
    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=lambda seconds: None))


@pytest.fixture
def hf_hub(tmp_path, monkeypatch):
    """A started ``HubServer`` serving ``tmp_path/hub_repos``, with huggingface_hub pointed at it.

    The hub cache is ``tmp_path/hf_cache`` (empty), offline mode is off for the test; the server is stopped
    afterwards. Add files with ``hf_hub.add_file(repo_id, filename, data)``; ``hf_hub.seen()`` lists the
    requested paths.
    """
    server = HubServer(tmp_path / "hub_repos").start()
    point_hub_at(monkeypatch, server.url, tmp_path / "hf_cache")
    try:
        yield server
    finally:
        server.stop()
