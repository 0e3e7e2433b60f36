"""``cachemesh demo`` as a user runs it: a subprocess, its printout, then the requests it prints.

The demo builds its digits model beside its ``CACHEMESH_HOME`` (its origin is
the home's parent), converts the chat model from its GGUF, pulls both and
serves them; the test runs the printed curl commands and Python snippets
unchanged, checks the answers with the real ``openai`` client, then stops the
demo with SIGINT and checks that the server and its workers exit. The home is
the one the session's ``smollm2`` fixture converted the chat model in, the way
the demo converts it: here the demo finds that conversion in the cache, as a
second ``make demo`` does.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import psutil
import pytest

from cachemesh.demo import DEMO_LLM_NAME, DEMO_NAME, DEMO_QUESTION
from tests.convert.gguf_models import Converted, smollm2

__all__ = ["smollm2"]  # the session fixture, shared here

pytestmark = pytest.mark.slow


class Demo:
    """The demo process and what it has printed so far."""

    def __init__(self, home: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cachemesh", "demo"],
            env=os.environ | {"CACHEMESH_HOME": str(home)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout_s: float = 240.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text, re.MULTILINE)
            if found:
                return found
            if self.proc.poll() is not None:
                self._reader.join(5)
                break
            time.sleep(0.2)
        raise AssertionError(f"the demo never printed {pattern!r}; it printed:\n{self.text}")

    def block_after(self, heading: str) -> str:
        """The indented lines printed after ``heading``, dedented (a snippet to run)."""
        lines = self.lines[self.lines.index(heading) + 1:]
        while lines and not lines[0].strip():
            lines.pop(0)
        block = []
        for line in lines:
            if not line.startswith("  "):
                break
            block.append(line[2:])
        return "\n".join(block)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


@pytest.fixture
def demo(smollm2: Converted) -> Iterator[Demo]:
    d = Demo(Path(smollm2.settings.home))
    try:
        yield d
    finally:
        d.stop()


def run_python(snippet: str, namespace: dict | None = None) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(snippet, "<printed by cachemesh demo>", "exec"),
             {} if namespace is None else namespace)
    return out.getvalue()


def run_curl(command: str) -> str:
    done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (command, done.stderr)
    return done.stdout


def test_demo_serves_what_it_prints(demo: Demo, smollm2: Converted):
    url = demo.wait_for(r"^serving: (http://127\.0\.0\.1:\d+)").group(1)
    announced = demo.wait_for(r"^(ready|NOT READY): .*$")
    assert announced.group(1) == "ready", demo.text
    # The digits model came from the origin beside the home, the chat model from the
    # conversion of its GGUF; both through the cache's demo bucket.
    home = Path(smollm2.settings.home)
    assert (home.parent / "cachemesh-demo-origin" / DEMO_NAME).is_dir()
    for name in (DEMO_NAME, DEMO_LLM_NAME):
        assert (home / "buckets" / "demo" / name).is_dir()
    assert (home / "buckets" / "demo" / DEMO_LLM_NAME / "model.safetensors").read_bytes()[:8] \
        == (smollm2.view / "model.safetensors").read_bytes()[:8]
    assert f"Hugging Face folder: found in the cache (converted before)\n           {smollm2.view}" \
        in demo.text
    assert "verify:  ok" in demo.text
    page = demo.wait_for(r"^web page: (\S+)").group(1)
    assert page == f"{url}/ui" and "<title>cachemesh</title>" in run_curl(f"curl -sf {page}")

    # KServe V2: the printed request holds a digit, and the answer names it.
    label = int(demo.wait_for(r"the answer says (\d+)\)").group(1))
    # Each snippet runs on its own (a fresh namespace), with the input name the model's
    # metadata gives.
    assert run_python(demo.block_after("From Python:")).strip() == f"[{label}]"
    triton = demo.block_after("or with Triton's client, unchanged:")
    assert run_python(triton).strip() == f"[{label}]"
    # The same request over the gRPC address it prints, through Triton's gRPC client.
    grpc_address = demo.wait_for(r"KServe V2 gRPC on (127\.0\.0\.1:\d+)").group(1)
    assert run_python(triton.replace("tritonclient.http", "tritonclient.grpc").replace(
        "127.0.0.1:" + url.rsplit(":", 1)[1], grpc_address)).strip() == f"[{label}]"
    request_file = re.search(r"-d @(\S+)", demo.text).group(1)
    sent = {t["name"] for t in json.loads(Path(request_file).read_text())["inputs"]}
    meta = json.loads(run_curl(f"curl -sf {url}/v2/models/{DEMO_NAME}"))
    assert sent == {t["name"] for t in meta["inputs"]} == {"input-0"}
    assert 'InferInput("input-0"' in triton

    # The printed curl commands, as a shell runs them.
    commands = re.findall(r"^  (curl .*)$", demo.text.replace("\\\n", ""), re.MULTILINE)
    assert len(commands) == 8, commands
    if shutil.which("curl"):
        infer = run_curl(next(c for c in commands if "/infer" in c))
        assert f'"data":[{label}]' in infer
        assert f'"id":"{DEMO_LLM_NAME}"' in run_curl(next(
            c for c in commands if c.endswith(f"{url}/v1/models")))
        chat, stream = (c for c in commands if "/v1/chat/completions" in c)
        answer = run_curl(chat)
        assert "Paris" in answer, answer  # the printed question has a real answer
        assert re.search(r'"usage":\{"prompt_tokens":\d+,"completion_tokens":\d+', answer)
        events = [e for e in run_curl(stream).split("\n\n") if e.strip()]
        assert events[-1] == "data: [DONE]" and len(events) > 3

    # OpenAI: the printed snippet runs, and the real client gets a completion with usage.
    printed = run_python(demo.block_after("With the openai client, unchanged:"))
    assert re.search(r"CompletionUsage\(completion_tokens=\d+", printed)
    # The snippet prints the answer, then streams the same greedy answer again.
    first, streamed = printed.split("\n", 1)
    whole = first.split(" CompletionUsage(", 1)[0]
    assert "Paris" in whole and streamed == whole, printed
    base_url = re.search(r'OpenAI\(base_url="([^"]+)"', demo.text).group(1)
    assert base_url == url + "/v1"
    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60) as client:
        messages = [{"role": "user", "content": DEMO_QUESTION}]
        reply = client.chat.completions.create(model=DEMO_LLM_NAME, messages=messages,
                                               max_tokens=32, temperature=0)
        assert reply.choices[0].message.content == whole  # greedy: the same every time
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage.total_tokens == (reply.usage.prompt_tokens
                                            + reply.usage.completion_tokens)

    # Ctrl-C: the server drains and exits, and takes its workers with it.
    workers = psutil.Process(demo.proc.pid).children(recursive=True)
    assert workers, "the demo serves from worker processes"
    demo.proc.send_signal(signal.SIGINT)
    assert demo.proc.wait(60) == 0
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"workers left running: {alive}"
