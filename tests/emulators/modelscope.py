"""A ModelScope emulator that ModelScope's own client (``modelscope`` 1.40 through
``modelscope_hub``) accepts: its ``snapshot_download`` works against it.

HTTPS only, as the client puts ``https://`` in front of ``MODELSCOPE_DOMAIN``:
the certificate comes from a test certificate authority (``trustme``) whose PEM
file is :attr:`ModelScopeEmulator.ca_file`; point ``REQUESTS_CA_BUNDLE`` (the
client uses ``requests``) and ``CACHEMESH_CA_BUNDLE`` (or ``SSL_CERT_FILE``) at it.

What it speaks (the ``/api/v1`` surface the client downloads through)::

    GET      /api/v1/models/{org}/{name}                                repo info
    GET      /api/v1/models/{org}/{name}/revisions                      branches and tags
    GET      /api/v1/models/{org}/{name}/repo/files?Revision=&Recursive=&Root=
             {"Code": 200, "Data": {"Files": [...], "LatestCommitter": {"Id": …}}, "Success": true},
             cut at ``files_limit`` entries like the real service (3000)
    HEAD/GET /api/v1/models/{org}/{name}/repo?Revision=&FilePath=       200 (Range: 206), or
             302 to the blob origin (OSS-like, signed URL) for LFS files
    GET      /api/v1/repos/internalAccelerationInfo                     404 (not in Alibaba Cloud)

The token is taken from ``Authorization: Bearer`` or the ``m_session_id``
cookie. A private repo without one gets 401, with a token that cannot read it
403; an unknown repo 404; an unknown revision 404 on the file API. The default
branch is ``master``. Counters: ``served[(repo_id, path)]`` and
``blob_origin.served[sha256]``; ``corrupt(sha256)`` flips a byte.

From a script (prints one JSON line with the endpoint, the domain and the CA file)::

    python -m tests.emulators.modelscope --repo org/name=/path/to/model --ca-out ca.pem
        [--blob-origin-url https://… --export-blobs /srv/blobs]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import ssl
import sys
import tempfile
import threading
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import trustme

from tests.emulators._common import BlobOrigin, Content, Handler, Repo, ServerThread

FILES_LIMIT = 3000


def _ok(data: Any) -> dict:
    return {"Code": 200, "Data": data, "Message": "success", "RequestId": uuid.uuid4().hex,
            "Success": True}


def _fail(code: int, message: str) -> dict:
    return {"Code": code, "Data": None, "Message": message, "RequestId": uuid.uuid4().hex,
            "Success": False}


class ModelScopeEmulator:
    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, blob_port: int = 0,
                 blob_origin_url: str | None = None, files_limit: int = FILES_LIMIT,
                 tokens: Iterable[str] = ()) -> None:
        self.ca = trustme.CA()
        cert = self.ca.issue_cert(host, "localhost", "127.0.0.1")
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(tls)
        self._dir = tempfile.TemporaryDirectory(prefix="ms-emulator-")
        self.ca_file = Path(self._dir.name) / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.repos: dict[str, Repo] = {}
        self.tokens: set[str] = set(tokens)
        self.files_limit = files_limit
        self.corrupted: set[str] = set()
        self.served: Counter[tuple[str, str]] = Counter()
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self.blob_origin = BlobOrigin("modelscope-blobs", tls=tls, host=host, port=blob_port,
                                      external_url=blob_origin_url)
        self._server = ServerThread(self, host, port, tls)
        self.url = self._server.url
        self.domain = f"{host}:{self._server.port}"  # what MODELSCOPE_DOMAIN takes

    def start(self) -> ModelScopeEmulator:
        self.blob_origin.start()
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()
        self.blob_origin.stop()
        self._dir.cleanup()

    def __enter__(self) -> ModelScopeEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_repo(self, repo_id: str, *, private: bool = False, readers: Iterable[str] = ()) -> Repo:
        repo = Repo(repo_id, "model", "master", private, False, set(readers))
        self.tokens |= repo.readers
        self.repos[repo_id] = repo
        return repo

    def commit(self, repo_id: str, files: Mapping[str, bytes | Path | Content] | None = None,
               **kwargs: Any) -> str:
        repo = self.repos.get(repo_id) or self.add_repo(repo_id)
        sha = repo.commit(files, **kwargs)
        for path, content in repo.commits[sha].files.items():
            if repo.is_lfs(path, content):
                self.blob_origin.add(content)
        return sha

    def corrupt(self, sha256: str) -> None:
        self.corrupted.add(sha256)
        self.blob_origin.corrupted.add(sha256)

    def bytes_served(self, repo_id: str, path: str, content: bytes) -> int:
        sha = hashlib.sha256(content).hexdigest()
        return self.served[(repo_id, path)] + self.blob_origin.served[sha]

    # -- HTTP --------------------------------------------------------------------

    def _token(self, h: Handler) -> str | None:
        auth = h.headers.get("Authorization") or ""
        if auth.lower().startswith("bearer "):
            return auth[7:].strip() or None
        for part in (h.headers.get("Cookie") or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == "m_session_id" and value:
                return value
        return None

    def handle(self, h: Handler, method: str, path: str, query: dict[str, list[str]]) -> None:
        with self._lock:
            self.requests.append((method, path))
        segments = [unquote(s) for s in path.split("/")[1:]]
        if segments[:3] != ["api", "v1", "models"] or len(segments) < 5:
            h.send_json(404, _fail(404, f"no route for {path}"))
            return
        repo_id = f"{segments[3]}/{segments[4]}"
        repo = self.repos.get(repo_id)
        token = self._token(h)
        if repo is None:
            h.send_json(404, _fail(10010205001, f"model {repo_id} not found"))
            return
        if repo.private and token not in repo.readers:
            if token is None:
                h.send_json(401, _fail(401, "please log in first (MODELSCOPE_API_TOKEN)"))
            else:
                h.send_json(403, _fail(403, f"no permission to read {repo_id}"))
            return
        rest = segments[5:]
        arg = {k: v[0] for k, v in query.items()}
        if not rest:
            h.send_json(200, _ok(self._info(repo)))
        elif rest == ["revisions"]:
            h.send_json(200, _ok({"RevisionMap": self._revisions(repo)}))
        elif rest == ["repo", "files"]:
            self._files(h, repo, arg)
        elif rest == ["repo"]:
            self._download(h, repo, arg)
        else:
            h.send_json(404, _fail(404, f"no route for {path}"))

    def _info(self, repo: Repo) -> dict:
        org, name = repo.repo_id.split("/")
        return {"Id": abs(hash(repo.repo_id)) % 10**6, "Name": name, "Path": org,
                "ChineseName": name, "Visibility": 1 if repo.private else 5,
                "Description": "", "Tags": [], "Revision": repo.default_branch}

    def _revisions(self, repo: Repo) -> dict:
        branches = [{"Revision": b, "CommitId": sha, "CreatedAt": int(repo.commits[sha].timestamp)}
                    for b, sha in sorted(repo.branches.items())]
        tags = [{"Revision": t, "CommitId": sha, "CreatedAt": int(repo.tag_times[t])}
                for t, sha in sorted(repo.tags.items())]
        return {"Branches": branches, "Tags": tags}

    def _files(self, h: Handler, repo: Repo, arg: dict[str, str]) -> None:
        revision = arg.get("Revision") or repo.default_branch
        sha = repo.resolve(revision)
        if sha is None:
            h.send_json(404, _fail(10010205002, f"revision {revision} not found"))
            return
        recursive = arg.get("Recursive", "False").lower() == "true"
        root = (arg.get("Root") or "").strip("/")
        prefix = f"{root}/" if root else ""
        commit = repo.commits[sha]
        entries: dict[str, dict] = {}
        for path in sorted(commit.files):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            for depth in range(1, len(parts)):
                if recursive or depth == 1:
                    d = prefix + "/".join(parts[:depth])
                    entries.setdefault(d, {"Name": parts[depth - 1], "Path": d, "Type": "tree",
                                           "Size": 0, "Revision": sha})
            if recursive or len(parts) == 1:
                content = commit.files[path]
                entries[path] = {
                    "Name": parts[-1], "Path": path, "Type": "blob", "Size": content.size,
                    "Sha256": content.sha256, "IsLFS": repo.is_lfs(path, content),
                    "Revision": repo.last_change(sha, path), "Mode": "33188",
                    "CommittedDate": int(commit.timestamp),
                }
        listed = [entries[k] for k in sorted(entries)][: self.files_limit]
        committer = {"Id": sha, "ShortId": sha[:8], "AuthorName": "emulator",
                     "Message": commit.message, "CommittedDate": int(commit.timestamp)}
        h.send_json(200, _ok({"Files": listed, "LatestCommitter": committer,
                              "TotalCount": len(listed), "IsVisual": 0}))

    def _download(self, h: Handler, repo: Repo, arg: dict[str, str]) -> None:
        revision = arg.get("Revision") or repo.default_branch
        sha = repo.resolve(revision)
        path = arg.get("FilePath", "").lstrip("/")
        content = repo.commits[sha].files.get(path) if sha else None
        if content is None:
            h.send_json(404, _fail(404, f"file {path} not found at {revision}"))
            return
        if repo.is_lfs(path, content):
            location = self.blob_origin.signed_url(content.sha256, path.rsplit("/", 1)[-1])
            h.send_body(302, b"", {"Location": location}, content_type="text/plain")
            return

        def count(n: int) -> None:
            with self._lock:
                self.served[(repo.repo_id, path)] += n

        h.send_content(content, {"ETag": f'"{content.git_oid}"'},
                       corrupt=content.sha256 in self.corrupted, count=count)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve directories as a ModelScope hub (HTTPS).")
    parser.add_argument("--repo", action="append", default=[], metavar="ORG/NAME=DIR")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--blob-port", type=int, default=0)
    parser.add_argument("--ca-out", type=Path, help="copy the test CA's PEM here")
    parser.add_argument("--blob-origin-url", help="send LFS redirects to this origin instead")
    parser.add_argument("--export-blobs", type=Path, help="write LFS blobs here, named by sha256")
    args = parser.parse_args(argv)
    hub = ModelScopeEmulator(host=args.host, port=args.port, blob_port=args.blob_port,
                             blob_origin_url=args.blob_origin_url)
    for spec in args.repo:
        name, _, directory = spec.partition("=")
        root = Path(directory)
        files = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
        hub.commit(name, files, message="import")
    if args.ca_out:
        args.ca_out.write_bytes(hub.ca_file.read_bytes())
    if args.export_blobs:
        hub.blob_origin.export(args.export_blobs)
    hub.start()
    print(json.dumps({"endpoint": hub.url, "domain": hub.domain, "ca_file": str(args.ca_out or
                      hub.ca_file)}), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    hub.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
