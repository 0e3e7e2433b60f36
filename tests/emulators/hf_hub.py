"""A Hugging Face Hub emulator that the real ``huggingface_hub`` client accepts.

What it speaks (enough for ``snapshot_download``, ``hf_hub_download``,
``HfApi.model_info/dataset_info/list_repo_tree`` and ``cachemesh``'s ``hf://``):

    GET       /api/{models|datasets}/{org}/{name}[/revision/{rev}]   repo info, "sha" = commit
    GET       /api/{models|datasets}/{org}/{name}/tree/{rev}[/{path}]?recursive=&expand=&cursor=
              one page per request, next page in a ``Link: <…>; rel="next"`` header
    HEAD/GET  /[datasets/]{org}/{name}/resolve/{rev}/{path}
              regular files: 200 (Range: 206) with ETag = git blob id, X-Repo-Commit;
              LFS files: 302 to the blob origin (another port, a signed, expiring URL)
              with X-Linked-Etag = sha256, X-Linked-Size, X-Repo-Commit

Errors carry the Hub's ``X-Error-Code``: RepoNotFound (401 without a token, 404
with one; also for private repos the token cannot read), GatedRepo (401/403, on
downloads only: a gated repo's info and tree are public), RevisionNotFound,
EntryNotFound (with X-Repo-Commit); an unknown token gets 401 "Invalid
credentials in Authorization header". Branches, tags and any number of commits.

Counters: ``served[(repo_id, path)]`` bytes of regular files, ``blob_origin.served
[sha256]`` bytes of LFS files, ``resolves[(repo_id, path)]`` resolve GETs.
``corrupt(sha256)`` makes both serve one flipped byte for that content.

From a script (a benchmark), serving directories as repos until interrupted::

    python -m tests.emulators.hf_hub --repo org/name=/path/to/model [--repo …]
        [--port 8080] [--blob-port 8081] [--private-token TOKEN]
        [--blob-origin-url http://127.0.0.1:9000 --export-blobs /srv/blobs]

It prints one JSON line ``{"endpoint": …, "blob_origin": …}``. With
``--blob-origin-url``, LFS redirects point at that origin as
``<url>/<sha256>?<signed-looking query>`` (for example nginx serving a directory
of blobs named by sha256, which ``--export-blobs`` writes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from tests.emulators._common import (
    BlobOrigin,
    Content,
    Handler,
    Repo,
    ServerThread,
    b64,
    git_blob_id,
    unb64,
)

INVALID_TOKEN = "Invalid credentials in Authorization header"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class HfHubEmulator:
    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        blob_port: int = 0,
        blob_origin_url: str | None = None,
        tree_page_size: int = 1000,
        tokens: Iterable[str] = (),
    ) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.tokens: set[str] = set(tokens)
        self.tree_page_size = tree_page_size
        self.corrupted: set[str] = set()
        self.served: Counter[tuple[str, str]] = Counter()
        self.resolves: Counter[tuple[str, str]] = Counter()
        self.auth_seen: list[str | None] = []  # the Authorization header of each request
        self._lock = threading.Lock()
        self.blob_origin = BlobOrigin("repos", host=host, port=blob_port,
                                      external_url=blob_origin_url)
        self._server = ServerThread(self, host, port)
        self.url = self._server.url

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> HfHubEmulator:
        self.blob_origin.start()
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()
        self.blob_origin.stop()

    def __enter__(self) -> HfHubEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- content -----------------------------------------------------------------

    def add_repo(self, repo_id: str, *, repo_type: str = "model", private: bool = False,
                 gated: bool = False, readers: Iterable[str] = ()) -> Repo:
        repo = Repo(repo_id, repo_type, "main", private, gated, set(readers))
        self.tokens |= repo.readers
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def commit(self, repo_id: str, files: Mapping[str, bytes | Path | Content] | None = None,
               *, repo_type: str = "model", **kwargs: Any) -> str:
        """Commit files (creating a public repo on first use); returns the commit id."""
        repo = self.repos.get((repo_type, repo_id)) or self.add_repo(repo_id, repo_type=repo_type)
        sha = repo.commit(files, **kwargs)
        for path, content in repo.commits[sha].files.items():
            if repo.is_lfs(path, content):
                self.blob_origin.add(content)
        return sha

    def corrupt(self, sha256: str) -> None:
        self.corrupted.add(sha256)
        self.blob_origin.corrupted.add(sha256)

    def reset_counters(self) -> None:
        with self._lock:
            self.served.clear()
            self.resolves.clear()
            self.auth_seen.clear()
            self.blob_origin.served.clear()
            self.blob_origin.requests.clear()

    def bytes_served(self, repo_id: str, path: str, content: bytes) -> int:
        """Bytes served for one file, by the hub itself or by the blob origin."""
        sha = hashlib.sha256(content).hexdigest()
        return self.served[(repo_id, path)] + self.blob_origin.served[sha]

    # -- HTTP --------------------------------------------------------------------

    def handle(self, h: Handler, method: str, path: str, query: dict[str, list[str]]) -> None:
        auth = h.headers.get("Authorization")
        with self._lock:
            self.auth_seen.append(auth)
        token = auth[7:].strip() if auth and auth.lower().startswith("bearer ") else None
        if token is not None and token not in self.tokens:
            h.send_json(401, {"error": INVALID_TOKEN}, {"X-Error-Message": INVALID_TOKEN})
            return
        segments = path.split("/")[1:]
        if segments[:1] == ["api"] and len(segments) >= 4 and segments[1] in ("models", "datasets"):
            self._api(h, segments[1][:-1], segments[2:], query, token)
            return
        repo_type = "model"
        if segments[:1] == ["datasets"]:
            repo_type, segments = "dataset", segments[1:]
        if len(segments) >= 5 and segments[2] == "resolve":
            repo_id = f"{unquote(segments[0])}/{unquote(segments[1])}"
            self._resolve(h, repo_type, repo_id, unquote(segments[3]),
                          unquote("/".join(segments[4:])), token)
            return
        h.send_json(404, {"error": "Not Found"})

    def _error(self, h: Handler, status: int, code: str, message: str,
               extra: Mapping[str, str] | None = None) -> None:
        h.send_json(status, {"error": message},
                    {"X-Error-Code": code, "X-Error-Message": message, **(extra or {})})

    def _access(self, h: Handler, repo: Repo | None, token: str | None, *, download: bool) -> bool:
        """Answer an error and return False when the caller may not read ``repo``."""
        if repo is None or (repo.private and token not in repo.readers):
            self._error(h, 404 if token else 401, "RepoNotFound", "Repository not found")
            return False
        if download and repo.gated and token not in repo.readers:
            self._error(h, 403 if token else 401, "GatedRepo",
                        f"Access to model {repo.repo_id} is restricted. You must have access to"
                        " it and be authenticated to access it. Please log in.")
            return False
        return True

    def _commit_of(self, h: Handler, repo: Repo, revision: str) -> str | None:
        sha = repo.resolve(revision)
        if sha is None:
            self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha

    def _api(self, h: Handler, repo_type: str, rest: list[str], query: dict[str, list[str]],
             token: str | None) -> None:
        repo_id = f"{unquote(rest[0])}/{unquote(rest[1])}"
        repo = self.repos.get((repo_type, repo_id))
        if not self._access(h, repo, token, download=False):
            return
        assert repo is not None
        action = rest[2] if len(rest) > 2 else None
        if action is None or action == "revision":
            revision = unquote("/".join(rest[3:])) if action else repo.default_branch
            sha = self._commit_of(h, repo, revision)
            if sha is not None:
                h.send_json(200, self._info(repo, sha))
        elif action == "tree" and len(rest) >= 4:
            sha = self._commit_of(h, repo, unquote(rest[3]))
            if sha is not None:
                self._tree(h, repo, sha, unquote("/".join(rest[4:])).strip("/"), query)
        else:
            h.send_json(404, {"error": "Not Found"})

    def _info(self, repo: Repo, sha: str) -> dict:
        commit = repo.commits[sha]
        info = {
            "_id": uuid.uuid5(uuid.NAMESPACE_URL, repo.repo_id).hex[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": sha,
            "lastModified": _iso(commit.timestamp),
            "createdAt": _iso(repo.commits[next(iter(repo.commits))].timestamp),
            "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
            "usedStorage": sum(c.size for c in commit.files.values()),
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        return info

    def _entry(self, repo: Repo, path: str, content: Content) -> dict:
        if repo.is_lfs(path, content):
            pointer = content.lfs_pointer()
            return {"type": "file", "oid": git_blob_id(pointer), "size": content.size, "path": path,
                    "lfs": {"oid": content.sha256, "size": content.size,
                            "pointerSize": len(pointer)}}
        return {"type": "file", "oid": content.git_oid, "size": content.size, "path": path}

    def _tree(self, h: Handler, repo: Repo, sha: str, base: str,
              query: dict[str, list[str]]) -> None:
        files = repo.commits[sha].files
        recursive = (query.get("recursive") or ["false"])[0].lower() in ("true", "1")
        expand = (query.get("expand") or ["false"])[0]
        prefix = f"{base}/" if base else ""
        if base and not any(p.startswith(prefix) for p in files):
            self._error(h, 404, "EntryNotFound", f"{base} does not exist on \"{sha}\"",
                        {"X-Repo-Commit": sha})
            return
        entries: dict[str, dict] = {}
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            for depth in range(1, len(parts)):
                directory = prefix + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(directory, {
                        "type": "directory", "size": 0, "path": directory,
                        "oid": uuid.uuid5(uuid.NAMESPACE_URL, f"{sha}/{directory}").hex[:40]})
            if recursive or len(parts) == 1:
                entries[path] = self._entry(repo, path, files[path])
        ordered = [entries[k] for k in sorted(entries)]
        start = int(unb64(query["cursor"][0])) if query.get("cursor") else 0
        page = ordered[start:start + self.tree_page_size]
        headers = {}
        if start + self.tree_page_size < len(ordered):
            kind = f"{repo.repo_type}s"
            encoded_base = "/" + quote(base, safe="") if base else ""
            nxt = (f"{self.url}/api/{kind}/{repo.repo_id}/tree/{sha}{encoded_base}"
                   f"?recursive={str(recursive)}&expand={expand}"
                   f"&cursor={b64(str(start + self.tree_page_size))}")
            headers["Link"] = f'<{nxt}>; rel="next"'
        h.send_json(200, page, headers)

    def _resolve(self, h: Handler, repo_type: str, repo_id: str, revision: str, path: str,
                 token: str | None) -> None:
        repo = self.repos.get((repo_type, repo_id))
        if not self._access(h, repo, token, download=True):
            return
        assert repo is not None
        sha = self._commit_of(h, repo, revision)
        if sha is None:
            return
        content = repo.commits[sha].files.get(path)
        if content is None:
            self._error(h, 404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": sha})
            return
        if h.command == "GET":
            with self._lock:
                self.resolves[(repo_id, path)] += 1
        if repo.is_lfs(path, content):
            location = self.blob_origin.signed_url(content.sha256, path.rsplit("/", 1)[-1])
            h.send_body(302, b"", {
                "Location": location,
                "X-Repo-Commit": sha,
                "X-Linked-Etag": f'"{content.sha256}"',
                "X-Linked-Size": str(content.size),
                "ETag": f'"{content.sha256}"',
            }, content_type="text/plain")
            return

        def count(n: int) -> None:
            with self._lock:
                self.served[(repo_id, path)] += n

        h.send_content(content, {"ETag": f'"{content.git_oid}"', "X-Repo-Commit": sha},
                       corrupt=content.sha256 in self.corrupted, count=count)


def _files_of(directory: Path) -> dict[str, Path]:
    return {p.relative_to(directory).as_posix(): p for p in sorted(directory.rglob("*"))
            if p.is_file() and ".git" not in p.relative_to(directory).parts}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve directories as a Hugging Face Hub.")
    parser.add_argument("--repo", action="append", default=[], metavar="ORG/NAME=DIR",
                        help="serve DIR as model repo ORG/NAME (datasets/ORG/NAME for a dataset)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--blob-port", type=int, default=0)
    parser.add_argument("--blob-origin-url", help="send LFS redirects to this origin instead")
    parser.add_argument("--export-blobs", type=Path, help="write LFS blobs here, named by sha256")
    parser.add_argument("--private-token", help="make the repos private, readable with this token")
    args = parser.parse_args(argv)
    hub = HfHubEmulator(host=args.host, port=args.port, blob_port=args.blob_port,
                        blob_origin_url=args.blob_origin_url)
    for spec in args.repo:
        name, _, directory = spec.partition("=")
        repo_type = "dataset" if name.startswith("datasets/") else "model"
        repo_id = name.removeprefix("datasets/")
        readers = [args.private_token] if args.private_token else []
        hub.add_repo(repo_id, repo_type=repo_type, private=bool(readers), readers=readers)
        hub.commit(repo_id, _files_of(Path(directory)), repo_type=repo_type, message="import")
    if args.export_blobs:
        hub.blob_origin.export(args.export_blobs)
    hub.start()
    print(json.dumps({"endpoint": hub.url, "blob_origin": hub.blob_origin.external_url
                      or hub.blob_origin.url}), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    hub.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
