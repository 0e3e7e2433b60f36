import subprocess
import sys

import cachemesh


def test_all_lists_exactly_the_public_names():
    public = {n for n in dir(cachemesh) if not n.startswith("_")} | {"__version__"}
    assert set(cachemesh.__all__) == public
    for name in cachemesh.__all__:
        assert getattr(cachemesh, name) is not None


def test_import_is_cheap():
    code = "import sys, cachemesh; print(sorted(m for m in ('torch', 'fastapi', 'boto3', 'rich') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
