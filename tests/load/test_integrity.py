"""Verified loads (load/integrity.py): a changed file never loads as if it were cached bytes.

The loader hashes safetensors files as their chunks land; every read path
(direct, buffered, small chunks, several threads) must give the file's own
sha256, so a right file always passes and one changed byte always fails.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
import torch

from cachemesh.errors import IntegrityError
from cachemesh.load import integrity, load_state_dict
from cachemesh.load.integrity import Expected, Verifier
from tests.load.conftest import all_dtype_tensors, evict


def expect(path: Path, committed_at: float | None = None) -> Expected:
    data = path.read_bytes()
    return Expected(hashlib.sha256(data).hexdigest(), len(data),
                    committed_at if committed_at is not None else time.time())


def overwrite(path: Path, offset: int, data: bytes, keep_mtime: bool = False) -> None:
    """What an attacker with write access does (and, with ``keep_mtime``, hides)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("direct_io, threads, chunk_bytes", [
    (None, None, None), (False, 1, 4096), (True, 3, 8192), (False, 2, 1 << 20)])
def test_a_verified_load_hashes_every_byte_on_every_read_path(st_file, direct_io, threads,
                                                              chunk_bytes):
    path = st_file(all_dtype_tensors())
    evict(path)
    verifier = Verifier({str(path): expect(path)}, full=True)
    loaded = verifier.run(lambda: load_state_dict(path, threads=threads,
                                                  chunk_bytes=chunk_bytes, direct_io=direct_io))
    assert verifier.verified == [str(path)] and not verifier.pending
    assert set(loaded) == set(all_dtype_tensors())
    # The same read paths over one changed byte in the tensor data, the header, the end.
    size = path.stat().st_size
    for offset in (size // 2, 9, size - 1):
        original = path.read_bytes()
        committed = expect(path)
        overwrite(path, offset, bytes([original[offset] ^ 0x20]), keep_mtime=True)
        verifier = Verifier({str(path): committed}, full=True)
        with pytest.raises(IntegrityError) as failure:  # the header's byte: a parse error first
            verifier.run(lambda: load_state_dict(path, threads=threads,
                                                 chunk_bytes=chunk_bytes, direct_io=direct_io))
        assert str(path) in str(failure.value) and committed.sha256 in str(failure.value)
        path.write_bytes(original)


def test_without_verification_only_a_suspect_file_is_hashed(st_file, tmp_path):
    tensors = {"w": torch.arange(4096, dtype=torch.float32)}
    path = st_file(tensors)
    committed = expect(path, committed_at=time.time() + 5)  # committed after its last write
    verifier = Verifier({str(path): committed})
    verifier.check()
    assert not verifier.pending and not verifier.suspect  # the cheap check: nothing to hash
    # A write after the commit shows in the modification time: the file is hashed.
    overwrite(path, path.stat().st_size - 64, b"\0" * 64)
    os.utime(path, (time.time() + 60, time.time() + 60))
    verifier = Verifier({str(path): committed})
    with pytest.raises(IntegrityError, match="was changed after it was cached"):
        verifier.run(lambda: load_state_dict(path))
    assert verifier.suspect == [str(path)]
    # A size that differs fails at once, before anything is read.
    with open(path, "ab") as f:
        f.write(b"x")
    with pytest.raises(IntegrityError, match="bytes on disk"):
        Verifier({str(path): committed}).check()


def test_files_the_loader_does_not_read_are_hashed_before_and_after(st_file, tmp_path):
    weights = st_file({"w": torch.ones(1000)})
    config = tmp_path / "model.joblib"
    config.write_bytes(os.urandom(10_000))
    files = {str(weights): expect(weights), str(config): expect(config)}
    verifier = Verifier(files, full=True)
    verifier.check()
    assert verifier.verified == [str(config)]  # hashed before the runtime reads it
    verifier.finish()  # the runtime read the weights some other way: hashed after
    assert sorted(verifier.verified) == sorted(files)
    overwrite(config, 4096, b"\0" * 4096, keep_mtime=True)
    with pytest.raises(IntegrityError) as failure:
        Verifier(files, full=True).check()
    assert failure.value.sha256 == files[str(config)].sha256


def test_no_active_verifier_means_no_hashing(st_file):
    path = st_file({"w": torch.ones(10)})
    assert integrity.claim(path) is None
    assert set(load_state_dict(path)) == {"w"}
