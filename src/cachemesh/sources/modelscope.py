"""ModelScope: ``ms://org/name[@revision]`` (``modelscope://`` works too).

Models only. Speaks the ``/api/v1`` file API that ModelScope's own client
(``modelscope`` 1.40, through ``modelscope_hub``) uses to download:

    GET {endpoint}/api/v1/models/{repo}                          repo info (exists? readable?)
    GET {endpoint}/api/v1/models/{repo}/repo/files?Revision=r&Recursive=True[&Root=dir]
        -> {"Code": 200, "Data": {"Files": [{"Path", "Type": "blob"|"tree", "Size",
            "Sha256", "Revision" (last commit of the file), ...}],
            "LatestCommitter": {"Id": commit, ...}}, "Success": true}
    GET {endpoint}/api/v1/models/{repo}/repo?Revision=r&FilePath=p   200, or 302 to OSS

The revision defaults to ``master``, as the client's ``snapshot_download`` does.
ModelScope does not resolve a branch to a commit the way the Hugging Face Hub
does: the listing pins ``LatestCommitter.Id`` when the server fills it in (the
cache's revision then is that commit, and a note says so otherwise), and files
are downloaded at the revision name, as the client does; every file is verified
by the ``Sha256`` of the listing, so a branch that moves in the middle of a pull
fails the pull instead of mixing two commits. The file API returns at most
:data:`TRUNCATION_LIMIT` entries per call, so a listing that hits the limit is
walked again folder by folder (``Root=``).

Environment (through ``Settings.environ``, with the client's precedence):
``MODELSCOPE_ENDPOINT`` (a URL), else ``MODELSCOPE_DOMAIN`` (a host; the client
puts ``https://`` in front of it, and so do we), else https://modelscope.cn;
``MODELSCOPE_API_TOKEN``, sent as ``Authorization: Bearer`` and as the
``m_session_id`` cookie, as the client does, only to the endpoint's host.
HTTPS certificates are checked against ``Settings.ca_bundle`` (certifi by default).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote_plus, unquote

import httpx

from ..errors import (
    AccessDeniedError,
    CachemeshError,
    InvalidInputError,
    SourceError,
    SourceNotFoundError,
    UnsafePathError,
)
from ..store.hub_layout import check_repo_id
from . import _hubhttp
from ._hubhttp import HttpRequest, redact
from .base import Listing, RemoteFile, RemoteSource, check_options, safe_name

if TYPE_CHECKING:
    from ..config import Settings

DEFAULT_ENDPOINT = "https://modelscope.cn"
DEFAULT_REVISION = "master"
# repo/files answers at most this many entries and silently drops the rest.
TRUNCATION_LIMIT = 3000
# Bound on folder-by-folder listings when a repo is larger than one answer.
MAX_LISTINGS = 5000
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def modelscope_endpoint(environ: Mapping[str, str]) -> str:
    """The endpoint the ModelScope client would use for this environment."""
    endpoint = (environ.get("MODELSCOPE_ENDPOINT") or "").strip()
    if not endpoint:
        endpoint = (environ.get("MODELSCOPE_DOMAIN") or "").strip() or DEFAULT_ENDPOINT
    if not endpoint.lower().startswith(("http://", "https://")):
        endpoint = f"https://{endpoint}"
    return endpoint.rstrip("/")


def parse_ms_uri(uri: str) -> tuple[str, str]:
    """``ms://org/name[@rev]`` -> (repo_id, revision)."""
    rest = uri.split("://", 1)[1] if "://" in uri else uri
    if rest.startswith("datasets/"):
        raise InvalidInputError(f"{uri}: ModelScope datasets are not supported, only models")
    rest = rest.removeprefix("models/")
    repo_id, at, revision = rest.partition("@")
    repo_id = repo_id.strip("/")
    revision = unquote(revision) if at else DEFAULT_REVISION
    try:
        check_repo_id(repo_id)
    except UnsafePathError as exc:
        raise InvalidInputError(f"{uri}: {exc} (expected ms://org/name[@revision])") from None
    if "/" not in repo_id:
        raise InvalidInputError(f"{uri}: a ModelScope model id is org/name")
    if not revision or any(ord(c) < 32 for c in revision):
        raise InvalidInputError(f"{uri}: invalid revision {revision!r}")
    return repo_id, revision


class ModelScopeSource(RemoteSource):
    schemes = ("ms", "modelscope")
    options = ()

    def __init__(self, repo_id: str, revision: str, settings: Settings) -> None:
        super().__init__(settings)
        self.repo_id, self.revision = repo_id, revision
        self.endpoint = modelscope_endpoint(settings.environ)
        self._token = (settings.environ.get("MODELSCOPE_API_TOKEN") or "").strip() or None
        self.uri = f"ms://{repo_id}@{revision}"
        self._api = f"{self.endpoint}/api/v1/models/{repo_id}"
        self._http = _hubhttp.HubConnection(settings)

    @classmethod
    def from_uri(cls, uri: str, options: Mapping[str, Any], settings: Settings) -> ModelScopeSource:
        check_options(cls, options)
        return cls(*parse_ms_uri(uri), settings)

    def default_name(self) -> str:
        name = self.repo_id.rsplit("/", 1)[-1]
        if self.revision != DEFAULT_REVISION:
            name = f"{name}-{self.revision}"
        return safe_name(name)

    @property
    def _describe(self) -> str:
        return f"{self.uri} at {self.endpoint}"

    @property
    def client(self) -> httpx.Client:
        return self._http.client

    def _headers(self) -> dict[str, str]:
        headers = {"Accept-Encoding": "identity"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
            headers["Cookie"] = f"m_session_id={self._token}"
        return headers

    # -- errors ------------------------------------------------------------------

    @staticmethod
    def _body(response: httpx.Response) -> dict:
        try:
            body = response.json()
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    def _error(self, response: httpx.Response, *, stage: str, path: str | None = None,
               cdn: bool = False) -> CachemeshError:
        status = response.status_code
        body = self._body(response)
        message = str(body.get("Message") or body.get("message") or "").strip()
        suffix = f": {message}" if message else ""
        what = f"{path} of {self._describe}" if path else self._describe
        if cdn:
            return SourceError(f"{what}: the storage ModelScope redirected to"
                               f" ({redact(str(response.url))}) answered {status}")
        if status == 401 or (status == 403 and not self._token):
            return AccessDeniedError(
                f"{self._describe} needs a token: set MODELSCOPE_API_TOKEN{suffix}"
                if not self._token else f"{self.endpoint} refused MODELSCOPE_API_TOKEN for"
                f" {self._describe}{suffix}")
        if status == 403:
            return AccessDeniedError(f"{self.endpoint} refused access to {what}{suffix}")
        if status == 404:
            if stage == "repo":
                hint = "" if self._token else " (if it is private, set MODELSCOPE_API_TOKEN)"
                return SourceNotFoundError(f"model {self.repo_id} was not found at"
                                           f" {self.endpoint}{hint}")
            if stage == "files":
                return SourceNotFoundError(f"model {self.repo_id} has no revision"
                                           f" {self.revision!r} at {self.endpoint}{suffix}")
            return SourceNotFoundError(f"{what}: not found{suffix}")
        return SourceError(f"{self.endpoint} answered {status} for {what}{suffix}")

    def _get_data(self, url: str, params: Mapping[str, str] | None, stage: str) -> Any:
        response = _hubhttp.send(self.client, url, self._headers(), params=params,
                                 what=f"listing {self.uri}")
        if response.status_code != 200:
            raise self._error(response, stage=stage)
        body = self._body(response)
        if not body:
            raise SourceError(f"{redact(url)} did not answer JSON; is the endpoint"
                              f" ({self.endpoint}) ModelScope?")
        if body.get("Success") is False:
            # Some failures come back as 200 with Success=false and a business code.
            code = body.get("Code")
            status = code if isinstance(code, int) and 400 <= code < 600 else 400
            raise self._error(httpx.Response(status, json=body), stage=stage)
        return body.get("Data", body)

    # -- listing -----------------------------------------------------------------

    def _files_page(self, root: str | None, recursive: bool) -> tuple[list[dict], dict]:
        params = {"Revision": self.revision, "Recursive": "True" if recursive else "False"}
        if root:
            params["Root"] = root
        data = self._get_data(f"{self._api}/repo/files", params, "files")
        if isinstance(data, list):
            return data, {}
        if not isinstance(data, dict):
            raise SourceError(f"{self._describe}: unexpected file listing")
        files = data.get("Files") or data.get("files") or []
        return files, data.get("LatestCommitter") or {}

    def _all_entries(self) -> tuple[list[dict], dict, list[str]]:
        entries, committer = self._files_page(None, True)
        notes: list[str] = []
        if len(entries) < TRUNCATION_LIMIT:
            return entries, committer, notes
        # The answer was cut at the limit: list folder by folder until each fits.
        found = {_path(e): e for e in entries}
        frontier, listings = [""], 1
        while frontier:
            root = frontier.pop()
            shallow, _ = self._files_page(root or None, False)
            listings += 1
            if len(shallow) >= TRUNCATION_LIMIT:
                notes.append(f"folder {root or '/'} holds {TRUNCATION_LIMIT} or more entries;"
                             " ModelScope cannot list it completely")
            for entry in shallow:
                found.setdefault(_path(entry), entry)
                if _is_dir(entry):
                    sub, _ = self._files_page(_path(entry), True)
                    listings += 1
                    for e in sub:
                        found.setdefault(_path(e), e)
                    if len(sub) >= TRUNCATION_LIMIT:
                        frontier.append(_path(entry))
            if listings > MAX_LISTINGS:
                raise SourceError(f"{self._describe}: more than {MAX_LISTINGS} listings"
                                  " needed to list the repo; giving up")
        return list(found.values()), committer, notes

    def list_files(self) -> Listing:
        self._get_data(self._api, None, "repo")
        entries, committer, notes = self._all_entries()
        files: list[RemoteFile] = []
        for entry in entries:
            if not isinstance(entry, dict) or _is_dir(entry):
                continue
            path = _path(entry)
            if not path:
                continue
            try:
                size = int(entry.get("Size", entry.get("size", 0)) or 0)
            except (TypeError, ValueError) as exc:
                raise SourceError(f"{path} of {self._describe}: bad size") from exc
            sha = str(entry.get("Sha256") or entry.get("sha256") or "").lower() or None
            if sha is not None and not _SHA256_RE.match(sha):
                raise SourceError(f"{path} of {self._describe}: bad Sha256 {sha!r}")
            tag = sha or str(entry.get("Revision") or "") or None
            files.append(RemoteFile(path, size, sha256=sha, origin_tag=tag,
                                    locator=self._file_url(path)))
        files.sort(key=lambda f: f.path)
        commit = str(committer.get("Id") or "") if isinstance(committer, dict) else ""
        if _COMMIT_RE.match(commit):
            revision = commit
        else:
            revision = self.revision
            notes.append(f"ModelScope did not say which commit {self.revision!r} is at;"
                         " the cache records the revision name")
        return Listing(files, revision=revision, notes=notes)

    # -- reading -----------------------------------------------------------------

    def _file_url(self, path: str) -> str:
        return (f"{self._api}/repo?Revision={quote_plus(self.revision)}"
                f"&FilePath={quote_plus(path)}")

    def request_for(self, file: RemoteFile) -> HttpRequest:
        """URL and headers to GET ``file`` (for the shared fetcher); large files are
        redirected to OSS, where the credentials must not be sent."""
        return HttpRequest(file.locator, self._headers())

    def read_range(self, file: RemoteFile, start: int, end: int) -> Iterator[bytes]:
        return self._http.reader.read(
            self.request_for(file), start, end, size=file.size,
            what=f"{file.path} of {self.uri}",
            on_error=lambda resp, cdn: self._error(resp, stage="file", path=file.path, cdn=cdn),
        )

    def close(self) -> None:
        self._http.close()


def _path(entry: dict) -> str:
    return str(entry.get("Path") or entry.get("path") or entry.get("Name") or "")


def _is_dir(entry: dict) -> bool:
    return (entry.get("Type") or entry.get("type") or "blob") == "tree"
