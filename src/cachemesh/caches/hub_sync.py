"""Keeping ``hub/`` (the Hugging Face cache layout, ``store/hub_layout.py``) in line with
the caches.

A repo's folder shows exactly what the Available caches of that repo hold: after
every pull and every removal the folder is made again from the catalog (its
claims). Caches in a protected bucket never appear there: ``hub/`` is readable by
every local user (``store/buckets.py``). A commit's tree, as the Hub listed it at
pull time, is kept in the catalog (``hub_trees``), so that a folder that comes back
(a bucket unprotected, gc repairing it) gets its trees again without the origin.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ..config import Settings
from ..errors import CachemeshError
from ..sources import parse_source
from ..store import Problem, Store
from ..store.hub_layout import HubClaim, HubFile, HubLayout, HubRepo, TreeEntry
from .catalog import CacheCatalog
from .spec import AVAILABLE


def same_repo(a: HubRepo | None, b: HubRepo) -> bool:
    return a is not None and (a.repo_type, a.repo_id) == (b.repo_type, b.repo_id)


def repo_of_folder(folder: str) -> HubRepo | None:
    """``models--org--name`` -> the repo, or None for a name that is not a repo folder."""
    kind, sep, rest = folder.partition("s--")
    try:
        return HubRepo(kind, rest.replace("--", "/")) if sep else None
    except CachemeshError:
        return None


class HubSync:
    """The ``hub/`` view of one store's caches."""

    def __init__(self, catalog: CacheCatalog, store: Store, hub: HubLayout,
                 settings: Settings) -> None:
        self.catalog, self.store, self.hub, self.settings = catalog, store, hub, settings

    def repo_of(self, row: dict[str, Any]) -> HubRepo | None:
        """The hub repo a cache's files show under (ref included), from its row."""
        options = json.loads(row["spec"]).get("options") or {}
        try:
            return parse_source(row["source"], options, self.settings).hub_repo()
        except CachemeshError:
            return None

    def _repos(self, only: str | None = None) -> dict[str, HubRepo]:
        """Available caches that show files under hub/ -> their repo (ref dropped)."""
        repos: dict[str, HubRepo] = {}
        protected = self.store.buckets.protected()
        for row in self.catalog.scan():
            if row["status"] != AVAILABLE or (only is not None and row["name"] != only):
                continue
            if row["bucket"] in protected:
                continue
            repo = self.repo_of(row)
            if repo is not None:
                repos[row["name"]] = HubRepo(repo.repo_type, repo.repo_id)
        return repos

    def repos_of_bucket(self, bucket: str) -> list[HubRepo]:
        repos: dict[str, HubRepo] = {}
        for row in self.catalog.rows(bucket):
            repo = self.repo_of(row)
            if repo is not None:
                repos[repo.folder] = HubRepo(repo.repo_type, repo.repo_id)
        return list(repos.values())

    def _claims(self, repo: HubRepo, including: str | None = None,
                hide: frozenset[str] = frozenset()) -> list[HubClaim]:
        """What each Available cache of ``repo`` (and ``including``) shows in its folder;
        caches of protected buckets (and of ``hide``) show nothing."""
        claims = []
        hidden = self.store.buckets.protected() | hide
        for row in self.catalog.scan():
            name = row["name"]
            if (row["status"] != AVAILABLE and name != including) or not row["revision"]:
                continue
            if row["bucket"] in hidden:
                continue
            mine = self.repo_of(row)
            if not same_repo(mine, repo):
                continue
            assert mine is not None
            files = {path: HubFile(self.store.blobs.path(r["sha256"]), r["origin_tag"] or "")
                     for path, r in self.store.file_rows(name).items()}
            if name == including:
                pulled_at = time.time()
            else:
                pulled_at = self.catalog.last_event_ts(name, "available") or 0.0
            claims.append(HubClaim(row["revision"], mine.ref, files, pulled_at))
        return claims

    def sync(self, repo: HubRepo, *, including: str | None = None,
             trees: dict[str, Any] | None = None, hide: frozenset[str] = frozenset()) -> None:
        """Make the repo's folder show its claims, with the commits' trees: ``trees``
        (new ones, from a pull) and those kept in the catalog."""
        with self.store.lock("hub", repo.folder), self.store.blob_lock(shared=True):
            claims = self._claims(repo, including, hide)
            self._keep_trees(repo, trees or {})
            self.hub.sync(repo, claims, self._kept_trees(repo, {c.commit for c in claims}))

    def sync_quietly(self, name: str, repo: HubRepo | None) -> None:
        """:meth:`sync`, a failure recorded as a warning event of cache ``name``."""
        if repo is None:
            return
        try:
            self.sync(repo)
        except CachemeshError as exc:
            self.catalog.add_event(name, "warning", f"could not update the hub view: {exc}",
                                   level="warning")

    def repair(self) -> None:
        """Bring every repo folder of hub/ in line (after a crash in the middle of a sync)."""
        for repo in {*self._repos().values(), *map(repo_of_folder, self.hub.folders())}:
            if repo is not None:
                self.sync(repo)

    def _keep_trees(self, repo: HubRepo, trees: dict[str, Any]) -> None:
        """Record new trees; forget those of commits no cache of the repo holds (any
        bucket, any status: a protected cache's tree is needed when it is shown again)."""
        held = {r["revision"] for r in self.catalog.scan()
                if r["revision"] is not None and same_repo(self.repo_of(r), repo)}
        docs = {commit: json.dumps({p: e.to_json() for p, e in sorted(entries.items())})
                for commit, entries in trees.items()}
        self.catalog.keep_trees(repo.folder, docs, held)

    def _kept_trees(self, repo: HubRepo, commits: set[str]) -> dict[str, dict[str, TreeEntry]]:
        return {commit: {p: TreeEntry(**e) for p, e in json.loads(doc).items()}
                for commit, doc in self.catalog.trees(repo.folder).items() if commit in commits}

    def verify(self, name: str | None) -> list[Problem]:
        """What is wrong under hub/ for cache ``name`` (every cache: also stray folders)."""
        repos = self._repos(name)
        problems: list[Problem] = []
        for repo in {r.folder: r for r in repos.values()}.values():
            problems.extend(self.hub.verify(repo, self._claims(repo)))
        if name is None:
            claimed = {r.folder for r in repos.values()}
            for folder in self.hub.folders():
                if folder not in claimed:
                    problems.append(Problem("hub-stray", f"hub/{folder}",
                                            "repo folder that no cache claims"))
        return problems
