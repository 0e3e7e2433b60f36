"""Hugging Face Hub: ``hf://org/name[@revision]``, ``hf://datasets/org/name[@revision]``.

The revision (a branch, a tag, ``refs/pr/N`` or a commit; ``main`` by default,
as huggingface_hub does) is resolved to a commit once, and everything after
that reads at that commit, so a pull is one consistent snapshot even if the
branch moves meanwhile. The protocol is the one huggingface_hub speaks:

    GET  {endpoint}/api/{models|datasets}/{repo}/revision/{rev}    -> {"sha": commit, ...}
    GET  {endpoint}/api/{type}s/{repo}/tree/{commit}?recursive=true  (Link: rel="next" pages)
         -> [{"type": "file", "path", "size", "oid", "lfs": {"oid", "size", "pointerSize"}?}]
    GET  {endpoint}/[datasets/]{repo}/resolve/{commit}/{path}   200, or 302 to the CDN (LFS)

Checksums: an LFS file is verified by the sha256 the tree publishes (``lfs.oid``)
before its blob becomes visible, like any file of any source. A regular git file
has no published sha256; its git blob id (``oid``: sha1 of ``b"blob <size>\\0"``
and the bytes) is verified while it streams, and a blob already held under the
same id is reused without fetching (``RemoteFile.git_sha1``). A file's
``origin_tag`` is its etag, the name huggingface_hub gives its blob: the sha256
for an LFS file, the git blob id otherwise.

Errors: the Hub says what went wrong in ``X-Error-Code`` (RepoNotFound,
RevisionNotFound, EntryNotFound, GatedRepo). It answers 401 RepoNotFound both
for a missing repo and for a private one asked without a token, so without
``HF_TOKEN`` that is an :class:`AccessDeniedError` that says both; with a token
it is a :class:`SourceNotFoundError`.

Environment (through ``Settings.environ``, as huggingface_hub reads it):
``HF_ENDPOINT`` (a mirror; default https://huggingface.co), ``HF_TOKEN`` (then
``HUGGING_FACE_HUB_TOKEN``, then the token file ``huggingface-cli login``
writes: ``HF_TOKEN_PATH``, else ``$HF_HOME/token``, else
``~/.cache/huggingface/token``). ``HF_HUB_OFFLINE`` is for the programs that
read the cache, not for pulls, and is ignored here. The token is sent only to
the endpoint's host, never to the CDN, and appears in no URI, event or message.

Besides the cache's view, the files are shown in the Hugging Face cache layout
(``hub/``, see :mod:`cachemesh.store.hub_layout`) through :meth:`HfSource.hub_repo`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

import httpx

from ..errors import (
    AccessDeniedError,
    CachemeshError,
    InvalidInputError,
    SourceError,
    SourceNotFoundError,
    UnsafePathError,
)
from ..store.hub_layout import HubRepo, TreeEntry, check_repo_id, is_commit
from ..store.names import check_relpath
from . import _hubhttp
from ._hubhttp import HttpRequest, redact
from .base import Listing, RemoteFile, RemoteSource, check_options, safe_name

if TYPE_CHECKING:
    from ..config import Settings

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_REVISION = "main"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_GIT_OID_RE = re.compile(r"^[0-9a-f]{40}$")
# The Hub answers this message (401) when the token itself is wrong.
_INVALID_TOKEN = "Invalid credentials in Authorization header"


def read_token(environ: Mapping[str, str]) -> str | None:
    """The Hugging Face token, looked up the way huggingface_hub does."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        value = (environ.get(name) or "").strip()
        if value:
            return value
    if environ.get("HF_TOKEN_PATH"):
        path = Path(environ["HF_TOKEN_PATH"]).expanduser()
    else:
        home = environ.get("HF_HOME")
        if home:
            base = Path(home).expanduser()
        else:
            xdg = environ.get("XDG_CACHE_HOME")
            user_home = Path(environ["HOME"]) if environ.get("HOME") else Path.home()
            base = (Path(xdg) if xdg else user_home / ".cache") / "huggingface"
        path = base / "token"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def parse_hf_uri(uri: str) -> tuple[str, str, str]:
    """``hf://[datasets/]org/name[@rev]`` -> (repo_type, repo_id, revision)."""
    rest = uri.removeprefix("hf://")
    repo_type = "model"
    for prefix, kind in (("datasets/", "dataset"), ("models/", "model")):
        if rest.startswith(prefix):
            repo_type, rest = kind, rest[len(prefix):]
            break
    if rest.startswith("spaces/"):
        raise InvalidInputError(f"{uri}: Spaces are not supported, only models and datasets")
    repo_id, at, revision = rest.partition("@")
    revision = unquote(revision) if at else DEFAULT_REVISION
    repo_id = repo_id.strip("/")
    try:
        check_repo_id(repo_id)
    except UnsafePathError as exc:
        raise InvalidInputError(f"{uri}: {exc} (expected hf://org/name[@revision])") from None
    if not revision or revision.startswith("/") or ".." in revision.split("/") \
            or any(ord(c) < 32 for c in revision):
        raise InvalidInputError(f"{uri}: invalid revision {revision!r}")
    return repo_type, repo_id, revision


class HfSource(RemoteSource):
    schemes = ("hf",)
    options = ()

    def __init__(self, repo_type: str, repo_id: str, revision: str, settings: Settings) -> None:
        super().__init__(settings)
        self.repo_type, self.repo_id, self.revision = repo_type, repo_id, revision
        env = settings.environ
        # Checked when the Hub is first asked (see client): identifying the repo, for
        # the hub/ view of caches pulled earlier, must not depend on today's endpoint.
        self.endpoint = (env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).strip().rstrip("/")
        self._token = read_token(env)
        kind = "datasets/" if repo_type == "dataset" else ""
        self.uri = f"hf://{kind}{repo_id}@{revision}"
        self._url_prefix = f"{self.endpoint}/{kind}{repo_id}"
        self._api = f"{self.endpoint}/api/{repo_type}s/{repo_id}"
        self._http = _hubhttp.HubConnection(settings, check=self._check_endpoint)

    @classmethod
    def from_uri(cls, uri: str, options: Mapping[str, Any], settings: Settings) -> HfSource:
        check_options(cls, options)
        return cls(*parse_hf_uri(uri), settings)

    # -- identity ----------------------------------------------------------------

    def default_name(self) -> str:
        name = self.repo_id.rsplit("/", 1)[-1]
        if self.revision != DEFAULT_REVISION:
            name = f"{name}-{self.revision[:12] if is_commit(self.revision) else self.revision}"
        return safe_name(name)

    def hub_repo(self) -> HubRepo:
        ref = None if is_commit(self.revision) else self.revision
        return HubRepo(self.repo_type, self.repo_id, ref)

    @property
    def _describe(self) -> str:
        return f"{self.uri} at {self.endpoint}"

    # -- HTTP --------------------------------------------------------------------

    @property
    def client(self) -> httpx.Client:
        return self._http.client

    def _check_endpoint(self) -> None:
        if not self.endpoint.startswith(("http://", "https://")):
            raise InvalidInputError(f"HF_ENDPOINT must be an http(s) URL, got {self.endpoint!r}")

    def _headers(self) -> dict[str, str]:
        headers = {"Accept-Encoding": "identity"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def _error(self, response: httpx.Response, *, path: str | None = None,
               cdn: bool = False) -> CachemeshError:
        """The Hub's answer as one of our errors, naming the repo, revision or file."""
        status = response.status_code
        code = response.headers.get("X-Error-Code", "")
        message = response.headers.get("X-Error-Message", "")
        what = f"{path} of {self._describe}" if path else self._describe
        if cdn:
            return SourceError(
                f"{what}: the storage the Hub redirected to ({redact(str(response.url))})"
                f" answered {status}, also with a freshly signed URL"
            )
        if code == "GatedRepo":
            how = ("the account of HF_TOKEN has not been granted access" if self._token
                   else "no HF_TOKEN is set")
            return AccessDeniedError(
                f"{self._describe} is gated: accept its conditions on"
                f" {self.endpoint}/{self.repo_id} and set HF_TOKEN ({how})"
            )
        if code == "RevisionNotFound":
            return SourceNotFoundError(
                f"{self.repo_type} {self.repo_id} has no revision {self.revision!r}"
                f" at {self.endpoint}"
            )
        if code == "EntryNotFound":
            return SourceNotFoundError(f"{what}: no such file at this revision")
        if status == 401 and message == _INVALID_TOKEN:
            return AccessDeniedError(f"{self.endpoint} refused HF_TOKEN (invalid or expired)"
                                     f" while reading {self._describe}")
        if code == "RepoNotFound" or status in (401, 404):
            if status == 404 and path and not code:
                return SourceNotFoundError(f"{what}: not found")
            if not self._token:
                return AccessDeniedError(
                    f"{self.repo_type} {self.repo_id} was not found at {self.endpoint}, or it"
                    " is private or gated and needs a token: set HF_TOKEN"
                )
            return SourceNotFoundError(
                f"{self.repo_type} {self.repo_id} was not found at {self.endpoint}"
                " (or the token in HF_TOKEN cannot read it)"
            )
        if status == 403:
            return AccessDeniedError(f"{self.endpoint} refused access to {what}"
                                     f"{': ' + message if message else ''}")
        return SourceError(f"{self.endpoint} answered {status} for {what}"
                           f"{': ' + message if message else ''}")

    def _get_json(self, url: str,
                  params: Mapping[str, str] | None = None) -> tuple[Any, httpx.Response]:
        response = _hubhttp.send(self.client, url, self._headers(), params=params,
                                 what=f"listing {self.uri}")
        if response.status_code != 200:
            raise self._error(response)
        try:
            return response.json(), response
        except ValueError as exc:
            raise SourceError(f"{redact(url)} did not answer JSON; is HF_ENDPOINT"
                              f" ({self.endpoint}) a Hugging Face Hub?") from exc

    # -- listing -----------------------------------------------------------------

    def resolve_commit(self) -> str:
        """The commit the revision points at now."""
        info, _ = self._get_json(f"{self._api}/revision/{quote(self.revision, safe='')}")
        commit = info.get("sha") if isinstance(info, dict) else None
        if not isinstance(commit, str) or not is_commit(commit):
            raise SourceError(f"{self._describe}: the Hub did not say which commit"
                              f" {self.revision!r} is")
        return commit

    def _tree(self, commit: str) -> Iterator[dict]:
        url: str | None = f"{self._api}/tree/{commit}"
        params: dict[str, str] | None = {"recursive": "true", "expand": "false"}
        while url is not None:
            page, response = self._get_json(url, params)
            if not isinstance(page, list):
                raise SourceError(f"{self._describe}: the tree listing is not a list")
            yield from page
            nxt = response.links.get("next", {}).get("url")
            url = str(response.url.join(nxt)) if nxt else None
            params = None  # the next link carries its own query
            if url is not None and not _hubhttp.same_origin(url, self.endpoint):
                raise SourceError(f"{self._describe}: the tree listing points its next page"
                                  f" to another host ({redact(url)})")

    def list_files(self) -> Listing:
        commit = self.resolve_commit()
        files: list[RemoteFile] = []
        tree: dict[str, TreeEntry] = {}
        for entry in self._tree(commit):
            if not isinstance(entry, dict) or entry.get("type") != "file":
                continue
            try:
                raw, size, oid = str(entry["path"]), int(entry["size"]), str(entry["oid"])
            except (KeyError, TypeError, ValueError) as exc:
                raise SourceError(f"{self._describe}: malformed tree entry {entry!r}") from exc
            # One spelling everywhere (view, snapshot, trees/): "a//b" and "./a/./b" are
            # "a/b"; a path that escapes is refused, even for a file a filter leaves out.
            path = check_relpath(raw, f"file path listed by {self._describe}")
            if path in tree:
                raise UnsafePathError(f"{self._describe} lists {path!r} twice")
            lfs = entry.get("lfs")
            if isinstance(lfs, dict) and lfs.get("oid"):
                sha256, lfs_size = str(lfs["oid"]).lower(), int(lfs.get("size", size))
                if not _SHA256_RE.match(sha256):
                    raise SourceError(f"{path} of {self._describe}: bad LFS sha256 {sha256!r}")
                tree[path] = TreeEntry(size, oid, sha256, lfs_size)
                files.append(RemoteFile(path, lfs_size, sha256=sha256, origin_tag=sha256,
                                        locator=self._resolve_url(commit, raw)))
            else:
                if not _GIT_OID_RE.match(oid):
                    raise SourceError(f"{path} of {self._describe}: bad git blob id {oid!r}")
                tree[path] = TreeEntry(size, oid)
                files.append(RemoteFile(path, size, git_sha1=oid, origin_tag=oid,
                                        locator=self._resolve_url(commit, raw)))
        files.sort(key=lambda f: f.path)
        return Listing(files, revision=commit, hub_tree=tree)

    # -- reading -----------------------------------------------------------------

    def _resolve_url(self, commit: str, path: str) -> str:
        return f"{self._url_prefix}/resolve/{commit}/{quote(path)}"

    def request_for(self, file: RemoteFile) -> HttpRequest:
        """URL and headers to GET ``file`` (for the shared fetcher): the resolve URL at
        the pinned commit; the Hub redirects LFS files to its CDN."""
        return HttpRequest(file.locator, self._headers())

    def read_range(self, file: RemoteFile, start: int, end: int) -> Iterator[bytes]:
        return self._http.reader.read(
            self.request_for(file), start, end, size=file.size,
            what=f"{file.path} of {self.uri}",
            on_error=lambda resp, cdn: self._error(resp, path=file.path, cdn=cdn),
        )

    def close(self) -> None:
        self._http.close()

