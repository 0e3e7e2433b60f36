import subprocess
import sys
from types import ModuleType

import cachemesh


def bound_public_names() -> set[str]:
    """The public names the package itself binds (not what ``dir()`` says: its __dir__
    returns __all__). Submodules are left out: importing one binds its name."""
    return {name for name, value in vars(cachemesh).items()
            if not name.startswith("_") and not isinstance(value, ModuleType)}


def test_all_lists_exactly_the_public_names():
    for name in cachemesh.__all__:  # binds the lazy ones (its __getattr__ keeps them)
        assert getattr(cachemesh, name) is not None
    assert set(cachemesh.__all__) == bound_public_names() | {"__version__"}
    assert len(cachemesh.__all__) == len(set(cachemesh.__all__))


def test_the_lazy_names_are_listed_and_bound_only_on_use():
    code = ("import cachemesh; print(sorted(n for n in vars(cachemesh)"
            " if n in ('pull', 'load_state_dict', 'iter_tensors', 'load_pretrained')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert {"pull", "load_state_dict", "iter_tensors", "load_pretrained"} <= set(cachemesh.__all__)


def test_import_is_cheap():
    code = "import sys, cachemesh; print(sorted(m for m in ('torch', 'fastapi', 'boto3', 'rich') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
