"""The Hugging Face cache layout view: ``$CACHEMESH_HOME/hub``.

Programs built on huggingface_hub (transformers, diffusers, vLLM, TGI) look for
models in the directory named by ``HF_HUB_CACHE``. For every cache pulled from
Hugging Face, cachemesh also shows its files in that layout, so that::

    HF_HUB_CACHE=$CACHEMESH_HOME/hub HF_HUB_OFFLINE=1 python serve.py

finds ``org/name`` unchanged, from the store or from a read-only bind mount of
``hub/`` (or of any folder below it)::

    hub/
      models--org--name/               datasets--org--name for a dataset
        blobs/<etag>                   hardlink to the store's blob; the etag is the
                                       sha256 of an LFS file, the git blob id otherwise
        snapshots/<commit>/<path>      hardlink to the same blob
        refs/<revision>                the commit a branch or tag resolved to, as
                                       40 hex digits without a newline ("refs/pr/1"
                                       nests, as huggingface_hub writes it)
        trees/<commit>.json            the commit's complete file list, in the format
                                       huggingface_hub's ``_tree_cache`` reads:
                                       {"format_version": 1, "files": {path: {"size",
                                       "blob_id", "lfs_sha256"?, "lfs_size"?}}}

The view is derived, never authoritative: :meth:`HubLayout.sync` makes one repo
folder show exactly the union of what the caches *claim* (each Available cache
pulled from that repo claims its files at its commit, and its branch or tag);
the caller (``cachemesh.caches.hub_sync``) builds the claims from the database after
every pull and every removal, so removing one cache keeps what another cache
of the same repo revision still shows, and ``cachemesh gc`` syncs every repo
folder again (repairing what ``cachemesh cache verify`` reports as ``hub-*``).
The trees come from meta.db (``hub_trees``, kept by the caller from the pull's
listing), so a folder hidden and shown again (a bucket protected, then
unprotected) or a tree removed behind cachemesh's back gets its tree back.
Anything else found in a repo folder (a ``.no_exist/`` marker, a file some
other tool wrote) is removed by the next sync: ``hub/`` belongs to cachemesh.

Order of writes, so that a crash cannot lie: blobs, then snapshot files, then
``trees/``, then ``refs/`` last, so that a branch name moves to a new commit
only once its snapshot is complete; removal runs the other way round. Every
file appears atomically (linked or written under ``tmp/links/``, then renamed
into place), so a reader sees the old file or the new one, never a partial one.

``trees/<commit>.json`` always lists the whole commit, also when the caches hold
only some of its files (include/exclude). That is what huggingface_hub itself
writes after a filtered download, and it makes an offline
``snapshot_download()`` that asks for everything fail with
``IncompleteSnapshotError`` (naming the missing files) instead of returning a
folder that lacks them; with ``allow_patterns`` matching what was pulled, it works.

Rejected: relative symlinks from ``snapshots/`` into ``../../blobs``, which is
what huggingface_hub writes. They break when only a snapshot folder is mounted
into a container (``-v …/snapshots/<commit>:/model:ro``), and a program that
resolves them ends up outside the folder it was given. huggingface_hub reads a
regular file in ``snapshots/`` the same way it reads a symlink.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StoreError, UnsafePathError
from . import Problem
from .locks import private_dirs
from .names import check_relpath
from .views import _ensure_dirs, link_atomic

TREE_FORMAT_VERSION = 1
REPO_TYPES = ("model", "dataset")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# A repo id component as the Hub accepts it: letters, digits, '-', '_', '.';
# '--' and '..' are refused (the first would make the folder name ambiguous).
_REPO_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_ETAG_RE = re.compile(r"^[0-9a-f]{40}$|^[0-9a-f]{64}$")


def is_commit(text: str) -> bool:
    return bool(_COMMIT_RE.match(text))


def check_repo_id(repo_id: str) -> str:
    """``org/name`` (or a legacy ``name``) safe to become a folder name."""
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    if not 1 <= len(parts) <= 2 or not all(
        _REPO_PART_RE.match(p) and "--" not in p and ".." not in p for p in parts
    ):
        raise UnsafePathError(
            f"invalid Hugging Face repo id {repo_id!r}: expected org/name with letters,"
            " digits, '-', '_' and '.' (no '--' or '..')"
        )
    return repo_id


@dataclass(frozen=True)
class HubRepo:
    """One repository of the Hub, and the branch or tag a cache asked for."""

    repo_type: str  # "model" or "dataset"
    repo_id: str  # "org/name"
    ref: str | None = None  # None when the cache was pinned to a commit

    def __post_init__(self) -> None:
        if self.repo_type not in REPO_TYPES:
            raise UnsafePathError(f"unknown Hugging Face repo type {self.repo_type!r}")
        check_repo_id(self.repo_id)
        if self.ref is not None:
            check_relpath(self.ref, "revision name")

    @property
    def folder(self) -> str:
        """``models--org--name``: the folder name huggingface_hub uses."""
        return f"{self.repo_type}s--" + self.repo_id.replace("/", "--")


@dataclass(frozen=True)
class TreeEntry:
    """One file of a commit as the Hub's tree API lists it (see ``trees/``)."""

    size: int
    blob_id: str  # git blob id (of the LFS pointer, for an LFS file)
    lfs_sha256: str | None = None
    lfs_size: int | None = None

    def to_json(self) -> dict:
        out: dict = {"size": self.size, "blob_id": self.blob_id}
        if self.lfs_sha256 is not None:
            out["lfs_sha256"] = self.lfs_sha256
            out["lfs_size"] = self.lfs_size
        return out


@dataclass(frozen=True)
class HubFile:
    blob: Path  # the store's blob file (blobs/sha256/ab/abcd…)
    etag: str  # the name under hub/<repo>/blobs/


@dataclass
class HubClaim:
    """What one cache shows in a repo folder."""

    commit: str
    ref: str | None
    files: dict[str, HubFile] = field(default_factory=dict)  # repo path -> blob
    pulled_at: float = 0.0  # the latest pull wins a branch name claimed at two commits


def _write_atomic(target: Path, data: bytes, staging: Path) -> None:
    try:
        if target.is_file() and not target.is_symlink() and target.read_bytes() == data:
            return
    except OSError:
        pass
    private_dirs(staging)  # under tmp/, private like it
    tmp = staging / f"{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o444)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _link(blob: Path, target: Path, staging: Path) -> None:
    """``target`` becomes a hardlink to ``blob``, atomically."""
    if not target.is_symlink():
        link_atomic(blob, target, staging)
        return
    # link_atomic takes a symlink to the blob for done; the view must hold the inode itself.
    private_dirs(staging)  # under tmp/, private like it
    tmp = staging / f"{uuid.uuid4().hex}.link"
    os.link(blob, tmp)
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _walk_files(root: Path) -> dict[str, Path]:
    """Every non-directory entry below ``root`` (symlinks included), by relative path."""
    found: dict[str, Path] = {}
    if not root.is_dir() or root.is_symlink():
        return found
    for dirpath, dirnames, filenames in os.walk(root):
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in filenames + links:
            full = Path(dirpath, name)
            found[full.relative_to(root).as_posix()] = full
    return found


def _drop_empty_dirs(root: Path) -> None:
    if not root.is_dir():
        return
    for dirpath, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):
        if dirpath != str(root) and not os.listdir(dirpath):
            os.rmdir(dirpath)


def _same_inode(a: Path, b: Path) -> bool:
    try:
        return not a.is_symlink() and os.path.samefile(a, b)
    except OSError:
        return False


class HubLayout:
    """Writes and checks ``hub/``. The caller holds the repo's lock (see caches)."""

    def __init__(self, home: Path) -> None:
        self.root = Path(home) / "hub"
        self.staging = Path(home) / "tmp" / "links"

    def repo_dir(self, repo: HubRepo) -> Path:
        return self.root / repo.folder

    def folders(self) -> list[str]:
        """Repo folders present on disk."""
        if not self.root.is_dir():
            return []
        return sorted(e.name for e in os.scandir(self.root) if "--" in e.name)

    # -- writing ---------------------------------------------------------------

    @staticmethod
    def _wanted(
        claims: Iterable[HubClaim],
    ) -> tuple[dict[str, dict[str, HubFile]], dict[str, str], dict[str, Path]]:
        snapshots: dict[str, dict[str, HubFile]] = {}
        refs: dict[str, tuple[float, str]] = {}
        for claim in claims:
            if not is_commit(claim.commit):
                raise StoreError(f"hub view: {claim.commit!r} is not a commit id")
            files = snapshots.setdefault(claim.commit, {})
            for path, f in claim.files.items():
                if not _ETAG_RE.match(f.etag):
                    raise StoreError(f"hub view: {path} has no usable etag ({f.etag!r})")
                files[check_relpath(path, "file path")] = f
            if claim.ref is not None and claim.ref != claim.commit:
                ref = check_relpath(claim.ref, "revision name")
                if ref not in refs or claim.pulled_at >= refs[ref][0]:
                    refs[ref] = (claim.pulled_at, claim.commit)
        blobs = {f.etag: f.blob for files in snapshots.values() for f in files.values()}
        return snapshots, {r: c for r, (_, c) in refs.items()}, blobs

    def sync(
        self,
        repo: HubRepo,
        claims: Iterable[HubClaim],
        trees: Mapping[str, Mapping[str, TreeEntry]] | None = None,
    ) -> None:
        """Make the repo folder show exactly ``claims``; write ``trees`` given for a commit."""
        folder = self.repo_dir(repo)
        snapshots, refs, blobs = self._wanted(claims)
        if not snapshots:
            if folder.exists() or folder.is_symlink():
                _remove(folder)
            return
        try:
            self._write(folder, snapshots, refs, blobs, trees or {})
            self._prune(folder, snapshots, refs, blobs)
        except OSError as exc:
            raise StoreError(f"cannot write the Hugging Face view {folder}: {exc}") from exc

    def _write(
        self,
        folder: Path,
        snapshots: dict[str, dict[str, HubFile]],
        refs: dict[str, str],
        blobs: dict[str, Path],
        trees: Mapping[str, Mapping[str, TreeEntry]],
    ) -> None:
        folder = _ensure_dirs(self.root.parent, [self.root.name, folder.name])
        blob_dir = _ensure_dirs(folder, ["blobs"])
        for etag, blob in sorted(blobs.items()):
            _link(blob, blob_dir / etag, self.staging)
        for commit, files in sorted(snapshots.items()):
            snap = _ensure_dirs(folder, ["snapshots", commit])
            for path, f in sorted(files.items()):
                parts = path.split("/")
                target = _ensure_dirs(snap, parts[:-1]) / parts[-1]
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                _link(f.blob, target, self.staging)
        for commit, entries in sorted(trees.items()):
            if commit not in snapshots:
                continue
            doc = {
                "format_version": TREE_FORMAT_VERSION,
                "files": {p: entries[p].to_json() for p in sorted(entries)},
            }
            tree_dir = _ensure_dirs(folder, ["trees"])
            _write_atomic(tree_dir / f"{commit}.json",
                          json.dumps(doc, indent=1).encode(), self.staging)
        for ref, commit in sorted(refs.items()):
            parts = ref.split("/")
            parent = _ensure_dirs(folder, ["refs", *parts[:-1]])
            target = parent / parts[-1]
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            _write_atomic(target, commit.encode(), self.staging)

    def _prune(
        self,
        folder: Path,
        snapshots: dict[str, dict[str, HubFile]],
        refs: dict[str, str],
        blobs: dict[str, Path],
    ) -> None:
        for rel, path in _walk_files(folder / "refs").items():
            if rel not in refs:
                path.unlink()
        _drop_empty_dirs(folder / "refs")
        for rel, path in _walk_files(folder / "trees").items():
            if not (rel.endswith(".json") and rel[:-5] in snapshots):
                path.unlink()
        snap_root = folder / "snapshots"
        for entry in list(os.scandir(snap_root)) if snap_root.is_dir() else []:
            if entry.name not in snapshots:
                _remove(Path(entry.path))
                continue
            wanted = snapshots[entry.name]
            for rel, path in _walk_files(Path(entry.path)).items():
                if rel not in wanted:
                    path.unlink()
            _drop_empty_dirs(Path(entry.path))
        for rel, path in _walk_files(folder / "blobs").items():
            if rel not in blobs:
                path.unlink()
        for entry in list(os.scandir(folder)):
            if entry.name not in ("blobs", "snapshots", "refs", "trees"):
                _remove(Path(entry.path))

    # -- checking --------------------------------------------------------------

    def verify(self, repo: HubRepo, claims: Iterable[HubClaim]) -> list[Problem]:
        """Compare a repo folder with what the claims say it must show."""
        folder = self.repo_dir(repo)
        snapshots, refs, blobs = self._wanted(claims)
        problems: list[Problem] = []

        def report(kind: str, rel: str, detail: str) -> None:
            problems.append(Problem(kind, f"hub/{repo.folder}/{rel}", detail))

        if not snapshots:
            if folder.exists():
                report("hub-stray", "", "repo folder that no cache claims")
            return problems
        for etag, blob in sorted(blobs.items()):
            target = folder / "blobs" / etag
            if not target.exists() and not target.is_symlink():
                report("hub-missing-file", f"blobs/{etag}", "missing")
            elif not _same_inode(target, blob):
                report("hub-unlinked-file", f"blobs/{etag}", "not a hardlink to its store blob")
        for commit, files in sorted(snapshots.items()):
            for path, f in sorted(files.items()):
                target = folder / "snapshots" / commit / path
                rel = f"snapshots/{commit}/{path}"
                if not target.exists() and not target.is_symlink():
                    report("hub-missing-file", rel, "missing")
                elif not _same_inode(target, f.blob):
                    report("hub-unlinked-file", rel, "not a hardlink to its store blob")
            problems.extend(self._verify_tree(repo, folder, commit, files))
        for ref, commit in sorted(refs.items()):
            target = folder / "refs" / ref
            try:
                actual = target.read_text()
            except OSError:
                actual = None
            if actual != commit:
                report("hub-bad-ref", f"refs/{ref}", f"should name {commit}, holds {actual!r}")
        for rel in sorted(_walk_files(folder / "snapshots")):
            commit, _, path = rel.partition("/")
            if path not in snapshots.get(commit, {}):
                report("hub-stray", f"snapshots/{rel}", "in the view but claimed by no cache")
        for rel in sorted(_walk_files(folder / "refs")):
            if rel not in refs:
                report("hub-stray", f"refs/{rel}", "a ref that no cache claims")
        for rel in sorted(_walk_files(folder / "blobs")):
            if rel not in blobs:
                report("hub-stray", f"blobs/{rel}", "a blob that no snapshot uses")
        return problems

    def _verify_tree(
        self, repo: HubRepo, folder: Path, commit: str, files: Mapping[str, HubFile]
    ) -> list[Problem]:
        rel = f"trees/{commit}.json"
        where = f"hub/{repo.folder}/{rel}"
        try:
            doc = json.loads((folder / rel).read_text())
            listed = doc["files"]
            ok = doc.get("format_version") == TREE_FORMAT_VERSION and all(
                isinstance(listed.get(p), dict) and "blob_id" in listed[p] for p in files
            )
        except FileNotFoundError:
            return [Problem("hub-missing-tree", where, "missing")]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return [Problem("hub-missing-tree", where, f"unreadable: {exc}")]
        if not ok:
            return [Problem("hub-missing-tree", where, "does not list every file of the snapshot")]
        return []
