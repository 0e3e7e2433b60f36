"""Conversions as cached artifacts: pull the input, look the result up, or convert once.

``Conversions.convert(source, options)`` does, in order:

1. check the options against the target (no input touched yet);
2. bring the input in through the cache: a cache view directory or a cache
   name is used as it is, anything else is pulled like ``cachemesh pull``;
   the input cache is held open (``Caches.open``) until the end, so gc and
   eviction leave it alone;
3. compute the identity (identity.py) from the input's sha256s, the converter
   (library versions read from package metadata: nothing heavy is imported)
   and the options;
4. look the result up: cache ``<label>-<identity[:16]>`` in bucket
   ``converted``, Available, whose manifest carries the full identity. Found:
   done, no job, no work;
5. let the converter refuse an input it cannot handle (reads config.json only);
6. otherwise take ``locks/convert/<identity>.lock`` (a second converter of the
   same identity, in any process, waits here and then finds the result),
   create a job, run the converter into ``tmp/convert/<identity>/``, write the
   manifest, and store that directory as the result cache (local source; its
   files become blobs and the view). The staging directory is removed.

A conversion that fails leaves a Failed job with its log, and no result
cache: the staging directory is removed and a partly stored cache is
deleted. Results are ordinary caches: listed by ``cache ls``, evicted by
``gc`` when least recently used, pinned like any other.

The result cache's recorded source is its staging directory, which is gone
once the result is stored: refresh a converted model by converting again
(``cachemesh convert``), not with ``pull --refresh``.

Known cost (revisit with a store-level "adopt this directory"):
storing copies the staged files into blobs through the local source, so a
conversion needs the result's size twice on disk until the staging directory
is removed.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..caches import AVAILABLE, Caches, Progress, make_spec
from ..config import Settings
from ..errors import (
    CachemeshError,
    CacheNotFoundError,
    ConversionError,
    InvalidInputError,
)
from ..jobs import Job, JobRun, Jobs
from ..sources import parse_source, scheme_of
from ..store.locks import FileLock
from .base import ConvertOptions, ModelInput, get_converter
from .identity import identity_document, identity_of, read_manifest, write_manifest

BUCKET = "converted"
JOB_KIND = "convert"
# Share of a job's progress bar given to storing the result (the rest is the converter's).
STORE_SHARE = 0.1
# How long a waiter looks for the job that holds the lock before saying "another process".
WAIT_NOTICE_S = 2.0


@dataclass
class ConvertResult:
    view: Path  # the converted model's directory (a cache view)
    identity: str
    cache: str  # the result cache, in bucket "converted"
    cached: bool  # True: the result existed; nothing was converted
    job: str | None  # the job that converted it (None when cached)
    manifest: dict[str, Any]
    input_cache: str

    def to_dict(self) -> dict[str, Any]:
        return {"view": str(self.view), "identity": self.identity, "cache": self.cache,
                "cached": self.cached, "job": self.job, "input_cache": self.input_cache,
                "manifest": self.manifest}


def result_name(options: ConvertOptions, identity: str) -> str:
    """The result cache's name (and view path): deterministic, from the identity."""
    return f"{options.label()}-{identity[:16]}"


def make_options(to: str, quantization: str | None = None, tp: int | None = None) -> ConvertOptions:
    if not isinstance(to, str) or not to:
        raise InvalidInputError("a conversion target is required (--to ct2, onnx or safetensors)")
    if tp is not None and (isinstance(tp, bool) or not isinstance(tp, int) or tp < 1):
        raise InvalidInputError(f"--tp must be a positive integer, got {tp!r}")
    return ConvertOptions(target=to.strip().lower(), quantization=quantization or None, tp=tp)


class Conversions:
    """Conversions of one store: thin on purpose, the converters do the work."""

    def __init__(self, caches: Caches) -> None:
        self.caches = caches
        self.store = caches.store
        self.jobs = Jobs(caches.store)

    # -- input ---------------------------------------------------------------------

    def _cache_of_view(self, path: Path) -> str | None:
        """The cache whose view directory is ``path``, if any."""
        try:
            resolved = path.resolve()
            resolved.relative_to(self.store.views.root.resolve())
        except (OSError, ValueError):
            return None
        for info in self.caches.list():
            if Path(info.view).resolve() == resolved:
                return info.name
        return None

    def resolve_input(self, source: str, *, name: str | None = None, refresh: bool = False,
                      on_progress: Callable[[Progress], None] | None = None) -> str:
        """The name of an Available cache holding ``source`` (pulled if needed)."""
        if scheme_of(source) == "file" and "://" not in source:
            local = Path(source).expanduser()
            if local.is_dir():
                cache = self._cache_of_view(local)
                if cache is not None:
                    if refresh:
                        self.caches.pull(cache, refresh=True, on_progress=on_progress)
                    return cache
            elif not local.exists() and name is None and self.caches.exists(source):
                # A bare cache name: `cachemesh convert qwen --to ct2` after `pull --name qwen`.
                self.caches.pull(source, refresh=refresh, on_progress=on_progress)
                return source
        src = parse_source(source, {}, self.caches.settings)
        spec = make_spec(name=name or src.default_name(), source=source)
        self.caches.ensure(spec, refresh=refresh, on_progress=on_progress)
        return spec.name

    # -- lookup --------------------------------------------------------------------

    def lookup(self, name: str, identity: str) -> tuple[Path, dict[str, Any]] | None:
        """The stored result of a conversion, if it is complete and is what it claims."""
        try:
            info = self.caches.get(name)
        except CacheNotFoundError:
            return None
        if info.status != AVAILABLE:
            return None
        view = Path(info.view)
        manifest = read_manifest(view)
        if manifest is None or manifest.get("identity") != identity:
            return None
        self.caches.touch(name)
        return view, manifest

    # -- converting ----------------------------------------------------------------

    def convert(
        self,
        source: str,
        options: ConvertOptions,
        *,
        input_name: str | None = None,
        refresh: bool = False,
        on_pull: Callable[[Progress], None] | None = None,
        on_job: Callable[[Job], None] | None = None,
        on_wait: Callable[[Job | None], None] | None = None,
    ) -> ConvertResult:
        converter = get_converter(options.target)
        converter.check_options(options)
        input_cache = self.resolve_input(source, name=input_name, refresh=refresh,
                                         on_progress=on_pull)
        with self.caches.open(input_cache) as view:
            info = self.caches.get(input_cache)
            files = {rel: row["sha256"] for rel, row in self.store.file_rows(input_cache).items()}
            model = ModelInput(cache=input_cache, source=info.source, view=view, files=files)
            document = identity_document(converter, options, model)
            identity = identity_of(document)
            name = result_name(options, identity)

            # A hit needs no check: the result exists, so its input was accepted.
            found = self.lookup(name, identity)
            if found is not None:
                return ConvertResult(found[0], identity, name, True, None, found[1], input_cache)
            facts = converter.check(model, options)

            lock = self.store.lock("convert", identity)
            self._acquire(lock, identity, on_wait)
            try:
                found = self.lookup(name, identity)  # another process may have made it
                if found is not None:
                    return ConvertResult(found[0], identity, name, True, None, found[1],
                                         input_cache)
                spec = {"source": source, "input_cache": input_cache, "input_source": info.source,
                        "target": options.target, **options.identity_fields(),
                        "identity": identity, "result_cache": name}
                job = self.jobs.create(JOB_KIND, spec, key=identity)
                with self.jobs.run(job.id, listener=on_job) as run:
                    view_out, manifest = self._run(converter, model, options, facts, document,
                                                   identity, name, run)
                return ConvertResult(view_out, identity, name, False, job.id, manifest,
                                     input_cache)
            finally:
                lock.release()

    def _acquire(self, lock: FileLock, identity: str,
                 on_wait: Callable[[Job | None], None] | None) -> None:
        """Take the identity's lock; while another process holds it, tell ``on_wait``
        (once) which job is converting (None if it cannot be seen within a moment)."""
        notified = on_wait is None
        deadline = time.monotonic() + WAIT_NOTICE_S
        while not lock.acquire(timeout=0.2):
            if not notified:
                job = self.jobs.running(JOB_KIND, identity)
                if job is not None or time.monotonic() > deadline:
                    on_wait(job)  # type: ignore[misc]
                    notified = True

    def _run(self, converter: Any, model: ModelInput, options: ConvertOptions, facts: Any,
             document: dict[str, Any], identity: str, name: str,
             run: JobRun) -> tuple[Path, dict[str, Any]]:
        stage = self.store.blobs.tmp_dir / "convert" / identity
        if stage.exists():
            shutil.rmtree(stage)  # left by a conversion that died; we hold its lock
        stage.parent.mkdir(parents=True, exist_ok=True)
        versions = ", ".join(f"{k} {v}" for k, v in document["converter"]["versions"].items())
        run.log(f"input: cache {model.cache!r} ({model.source}), {len(model.files)} files")
        run.log(f"identity {identity}; converter {converter.name} revision {converter.revision}"
                f" ({versions}); options {options.identity_fields() or '{}'}")
        try:
            started = time.monotonic()
            run.progress(0.0, f"converting with {converter.name}")
            runtime = converter.convert(model, options, facts, stage, run)
            seconds = time.monotonic() - started
            if not stage.is_dir() or not any(stage.iterdir()):
                raise ConversionError(f"{converter.name} wrote nothing for {model.source}")
            write_manifest(stage, document, identity, facts.to_dict(), runtime)
            staged = _tree_bytes(stage)
            run.log(f"converted in {seconds:.1f} s: {staged} bytes in"
                    f" {sum(1 for p in stage.rglob('*') if p.is_file())} files")

            run.progress(1.0 - STORE_SHARE, "storing the result in the cache")
            if self.caches.exists(name):
                # Present but not a valid result (failed, or not what it claims): replace it.
                self.caches.rm(name, force=True)

            def stored(p: Progress) -> None:
                if p.bytes_total:
                    run.progress(1.0 - STORE_SHARE + STORE_SHARE * p.bytes_done / p.bytes_total)

            spec = make_spec(name=name, source=str(stage), bucket=BUCKET, path=name)
            result = self.caches.ensure(spec, on_progress=stored)
            found = self.lookup(name, identity)
            if found is None:
                raise ConversionError(
                    f"the stored result {name!r} does not carry identity {identity}")
            run.succeed({"view": str(result.view), "cache": name, "identity": identity,
                         "bytes": staged, "convert_seconds": round(seconds, 3)})
            run.log(f"stored as cache {name!r} in bucket {BUCKET!r}: {result.view}")
            return found
        except BaseException as exc:
            self._discard(name)
            if isinstance(exc, CachemeshError | KeyboardInterrupt):
                raise
            raise ConversionError(
                f"{converter.name} failed to convert {model.source}: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def _discard(self, name: str) -> None:
        """Remove a result cache that did not become Available: no half-written result."""
        try:
            if self.caches.exists(name) and self.caches.get(name).status != AVAILABLE:
                self.caches.rm(name, force=True)
        except CachemeshError:
            pass


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def convert(source: str, *, to: str, quantization: str | None = None, tp: int | None = None,
            settings: Settings | None = None, **kwargs: Any) -> ConvertResult:
    """Convert ``source`` (anything ``pull`` takes, a cache view or a cache name)."""
    caches = Caches(settings or Settings.from_env())
    return Conversions(caches).convert(source, make_options(to, quantization, tp), **kwargs)


__all__ = ["BUCKET", "Conversions", "ConvertResult", "convert", "make_options", "result_name"]
