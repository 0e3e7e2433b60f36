"""`cachemesh models deploy`: a local path that is not there is refused at once (400), and
an eager deploy waits for its outcome: Ready (exit 0) or Failed (non-zero, the reason)."""

from __future__ import annotations

import time
from pathlib import Path

from tests.blackbox.conftest import Server, cm, toy_model


def test_a_missing_local_path_is_a_400_at_once(server: Server, origins: Path):
    env = {**server.env, "CACHEMESH_URL": server.url}
    missing = origins / "no-such-model"
    for extra in ([], ["--eager"]):
        started = time.monotonic()
        done = cm(env, "models", "deploy", "gone", str(missing), *extra, check=False)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip() == (f"error: local source {missing} does not exist on this"
                                       " server (HTTP 400)")
        assert time.monotonic() - started < 5
    listed = cm(env, "models", "ls", "--json").stdout
    assert '"gone"' not in listed  # nothing was kept


def test_an_eager_deploy_waits_for_ready_or_says_why_it_failed(server: Server, origins: Path):
    env = {**server.env, "CACHEMESH_URL": server.url}
    source = str(toy_model(origins, "eager-toy"))
    ok = cm(env, "models", "deploy", "eager-ok", source, "--runtime", "custom",
            "--param", "class=toy:Toy", "--eager")
    assert ok.stdout == "deployed eager-ok (Ready)\n"
    bad = cm(env, "models", "deploy", "eager-bad", source, "--runtime", "custom",
             "--param", "class=toy:NoSuchClass", "--eager", check=False)
    assert bad.returncode != 0 and bad.stdout == ""
    assert bad.stderr.startswith("error: model 'eager-bad' failed: 2 failed loads:"), bad.stderr
    assert "NoSuchClass" in bad.stderr
    for name in ("eager-ok", "eager-bad"):
        cm(env, "models", "rm", name)
