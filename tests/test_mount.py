"""A view bind-mounted read-only, as a container would see it (hostPath, ro)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import cachemesh
from cachemesh.config import Settings
from tests.conftest import model_files

pytestmark = pytest.mark.mount

# Inside a private mount namespace: mount the view read-only at /mnt-like target,
# read every file as a program would, then try to change a blob through it.
SCRIPT = r"""
set -u
mount --bind -o ro "$VIEW" "$TARGET" || exit 90
sha256sum "$TARGET"/config.json "$TARGET"/weights/shard-00.bin
if sh -c "echo evil > '$TARGET/config.json'" 2>/dev/null; then echo WROTE; fi
if chmod 644 "$TARGET/config.json" 2>/dev/null; then echo CHMODDED; fi
if rm "$TARGET/config.json" 2>/dev/null; then echo REMOVED; fi
if touch "$TARGET/new" 2>/dev/null; then echo CREATED; fi
"""


def test_program_reads_a_read_only_bind_mount_and_cannot_change_a_blob(make_tree, tmp_path: Path):
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    files = model_files()
    view = cachemesh.pull(str(make_tree("m", files)), settings=Settings.from_env())
    target = tmp_path / "container-models"
    target.mkdir()
    proc = subprocess.run(["unshare", "-m", "sh", "-c", SCRIPT], capture_output=True, text=True,
                          env={"VIEW": str(view), "TARGET": str(target), "PATH": "/usr/bin:/bin"})
    if proc.returncode == 90 or "Operation not permitted" in proc.stderr:
        pytest.skip(f"cannot bind-mount here: {proc.stderr.strip()}")
    import hashlib

    lines = proc.stdout.split("\n")
    assert lines[0].split()[0] == hashlib.sha256(files["config.json"]).hexdigest()
    assert lines[1].split()[0] == hashlib.sha256(files["weights/shard-00.bin"]).hexdigest()
    for verb in ("WROTE", "CHMODDED", "REMOVED", "CREATED"):
        assert verb not in proc.stdout
    assert "Read-only file system" in proc.stderr or proc.stderr == ""
    # The blob and the view are untouched, and the mount did not leak out.
    assert (view / "config.json").read_bytes() == files["config.json"]
    assert list(target.iterdir()) == []
