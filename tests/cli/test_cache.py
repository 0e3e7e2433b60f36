"""The cache commands (pull, cache, gc, du), as a user runs them: a real subprocess, exit
codes, stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import model_files


def cm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "cachemesh", *args], capture_output=True,
                          text=True, env=os.environ.copy(), timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"cachemesh {args} failed ({proc.returncode}): {proc.stderr}")
    return proc


def test_pull_prints_the_view_and_every_listing_takes_json(make_tree, clean_env: Path):
    origin = make_tree("tiny", model_files())
    out = cm("pull", str(origin), "--name", "tiny", "--bucket", "team")
    view = Path(out.stdout.strip().splitlines()[-1])
    assert view == clean_env / "buckets/team/tiny"
    assert (view / "config.json").read_bytes() == model_files()["config.json"]

    listed = json.loads(cm("cache", "ls", "--json").stdout)
    assert [(c["name"], c["status"], c["bucket"]) for c in listed] == [("tiny", "Available", "team")]
    status = json.loads(cm("cache", "status", "tiny", "--json").stdout)
    assert status["progress"]["files_done"] == len(model_files())
    assert [e["kind"] for e in status["events"]] == ["created", "pull-started", "available"]
    du = json.loads(cm("du", "--json").stdout)
    assert du["logical_bytes"] == du["physical_bytes"] == sum(map(len, model_files().values()))
    assert json.loads(cm("cache", "verify", "--json").stdout) == {"ok": True, "problems": []}
    assert json.loads(cm("gc", "--json").stdout)["removed_caches"] == []
    cm("cache", "pin", "tiny")
    assert json.loads(cm("cache", "status", "tiny", "--json").stdout)["pinned"] is True
    cm("cache", "unpin", "tiny")
    text = cm("cache", "ls").stdout
    assert "tiny" in text and "Available" in text
    cm("cache", "rm", "tiny")
    assert json.loads(cm("cache", "ls", "--json").stdout) == []
    assert not view.exists()


@pytest.mark.parametrize("args,code,message", [
    (["pull", "gopher://x"], 2, "unknown source scheme"),
    (["pull", "/definitely/not/here"], 3, "does not exist"),
    (["pull", "{origin}", "--name", "../up"], 2, "invalid cache name"),
    (["pull", "{origin}", "--bucket", "a/b"], 2, "invalid bucket"),
    (["pull", "{origin}", "--path", "../../etc"], 2, "'..' is not allowed"),
    (["pull", "{origin}", "--size-limit", "0.0000001"], 5, "size limit"),
    (["pull", "{origin}", "--endpoint-url", "http://x"], 2, "do not take option"),
    (["cache", "status", "nope"], 3, "no cache named"),
    (["cache", "rm", "nope"], 3, "no cache named"),
    (["gc", "--max-size", "lots"], 2, "not a size"),
])
def test_bad_input_gets_a_clear_error_and_writes_nothing(make_tree, clean_env: Path, args, code,
                                                        message):
    origin = make_tree("m", {"w.bin": b"x" * 4096})
    proc = cm(*[a.format(origin=origin) for a in args], check=False)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    listed = json.loads(cm("cache", "ls", "--json").stdout)
    assert listed == []
    buckets = clean_env / "buckets"
    assert not buckets.exists() or not any(buckets.iterdir())


def test_verify_exits_nonzero_on_a_corrupt_blob(make_tree, clean_env: Path):
    view = Path(cm("pull", str(make_tree("m", {"w.bin": b"x" * 4096}))).stdout.strip())
    target = view / "w.bin"
    os.chmod(target, 0o644)
    target.write_bytes(b"y" * 4096)  # through the hardlink: the blob changes
    proc = cm("cache", "verify", check=False)
    assert proc.returncode == 1
    assert "corrupt-blob" in proc.stdout
