"""Benchmark: cold start of a causal LM, up to its first generated token.

    .venv/bin/python benchmarks/coldstart.py [--size 2gb|small] [--rounds 3] [--no-write]

The model: a ``LlamaForCausalLM`` with random weights in bf16 (``2gb``:
TinyLlama's shapes cut to 20 layers, 2.0 GB; ``small``: 4 layers of width 256,
for a smoke run) and a BPE tokenizer trained on the spot, saved once under
``.bench/coldstart/<size>/`` (git-ignored) and pulled into a cachemesh store
there (``cachemesh pull --name llm``), so it is in the cache but not loaded.

Three ways to the first token, each with the page cache dropped first
(``sync; echo 3 > /proc/sys/vm/drop_caches``), in a rotated order each round:

- ``server cold``: from starting ``cachemesh serve --model llm=<dir>`` until
  the answer to ``POST /v1/completions`` (``max_tokens: 1``) sent as soon as the
  port accepts;
- ``server up``: the same server already started (model not loaded), from the
  request to its answer;
- ``plain script``: a fresh ``python`` that imports transformers, calls
  ``from_pretrained`` on the same files, and generates one token; the wall time
  from its start until it prints the token.

Phases. For the server, ``GET /api/v1/models/llm/stats`` reports the worker's
imports of torch and transformers, the weights (``load_pretrained``: reads and
model construction overlap there, so they are one phase), and the tokenizer;
"up" is the server process until its port accepts, "rest" what is left (the
request's way through the server and the first token). The plain script times
its own imports, ``from_pretrained`` (reads and construction), tokenizer and
generate, and "startup" is the interpreter before its first line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import _report  # noqa: E402

drop_caches = _report.drop_page_cache
SIZES = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "2gb": (2048, 5632, 20, 32, 4, 32000),
    "small": (256, 688, 4, 8, 4, 32000),
}
PROMPT = "the quick brown fox"

PLAIN = r'''
import json, sys, time
t0 = time.time()
import torch, transformers
t1 = time.time()
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
t2 = time.time()
tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
t3 = time.time()
ids = tok(sys.argv[2], return_tensors="pt")["input_ids"]
with torch.inference_mode():
    out = model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
t4 = time.time()
print(json.dumps({"token": int(out[0, -1]), "imports_started_at": t0, "imports_done_at": t1,
                  "weights_done_at": t2, "tokenizer_done_at": t3, "token_at": t4}), flush=True)
'''
# The timeline of one run: seconds from its start (the process, or the request).
MARKS = ("up", "imports_started", "imports_done", "load_started", "built", "weights_done",
         "tokenizer_done", "token")


def build(size: str) -> tuple[Path, Path, Path]:
    """The model directory, the store's home and the model's view there, made once."""
    base = ROOT / ".bench" / "coldstart" / size
    model_dir, home = base / "model", base / "home"
    if not (model_dir / "config.json").is_file():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        sys.path.insert(0, str(ROOT))
        from tests.convert.models import train_tokenizer

        hidden, inter, layers, heads, kv, vocab = SIZES[size]
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                             num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=kv, max_position_embeddings=2048,
                             tie_word_embeddings=False, dtype="bfloat16")
        print(f"building a {size} Llama with random weights in {model_dir} ...", flush=True)
        with torch.device("cpu"):
            model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
        tmp = model_dir.with_name("model.tmp")
        model.save_pretrained(tmp, max_shard_size="1GB")
        train_tokenizer().save_pretrained(tmp)
        tmp.rename(model_dir)
        del model
    env = {**os.environ, "CACHEMESH_HOME": str(home)}
    # The cache the server would make for --model llm=<dir>: the same name and bucket.
    out = subprocess.run([str(ROOT / ".venv/bin/cachemesh"), "pull", str(model_dir), "--name",
                          "llm", "--bucket", "models"], env=env, check=True,
                         capture_output=True, text=True)
    return model_dir, home, Path(out.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir: Path, home: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "CACHEMESH_HOME": str(home)}
        self.started = time.time()
        self.proc = subprocess.Popen(
            # gRPC on a free port too: a server elsewhere on the machine may hold 8033.
            [str(ROOT / ".venv/bin/cachemesh"), "serve", "--port", str(self.port), "--grpc-port",
             str(free_port()), "--workers",
             "1", "--model", f"llm={model_dir}"], env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        self.client = httpx.Client(base_url=self.url, timeout=600)

    def wait_up(self) -> float:
        """When the port accepts, in seconds from the start of the process."""
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return time.time() - self.started
            except OSError:
                time.sleep(0.005)

    def settle(self, quiet_s: float = 3.0, limit_s: float = 120.0) -> None:
        """Wait until the worker's memory stops growing (its warm-up imports are done)."""
        self.client.get("/v2/health/ready")
        last, since, deadline = -1, time.time(), time.time() + limit_s
        while time.time() < deadline:
            rss = sum(w["rss_bytes"] for w in self.client.get("/api/v1/models").json()[
                "memory"]["workers"])
            if rss != last:
                last, since = rss, time.time()
            elif time.time() - since >= quiet_s:
                return
            time.sleep(0.25)

    def first_token(self) -> float:
        """Send the request; when its answer came (unix time)."""
        r = self.client.post("/v1/completions", json={
            "model": "llm", "prompt": PROMPT, "max_tokens": 1, "temperature": 0})
        r.raise_for_status()
        return time.time()

    def stats(self) -> dict[str, float]:
        return self.client.get("/api/v1/models/llm/stats").json()["stats"]

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _timeline(origin: float, up: float, stats: dict[str, float], token_at: float
              ) -> dict[str, float]:
    marks = {"up": up, "token": token_at - origin}
    for mark in MARKS[1:-1]:
        at = stats.get(f"{mark}_at")
        # Before the origin: the phase was over when the clock started (server up).
        marks[mark] = max(at - origin, 0.0) if at else float("nan")
    return marks


def server_cold(model_dir: Path, home: Path) -> dict[str, float]:
    drop_caches()
    server = Server(model_dir, home)
    try:
        up = server.wait_up()
        token_at = server.first_token()
        stats = server.stats()
    finally:
        server.stop()
    return _timeline(server.started, up, stats, token_at)


def server_up(model_dir: Path, home: Path) -> dict[str, float]:
    server = Server(model_dir, home)
    try:
        server.wait_up()
        server.settle()
        drop_caches()
        sent = time.time()
        token_at = server.first_token()
        stats = server.stats()
    finally:
        server.stop()
    return _timeline(sent, 0.0, stats, token_at)


def plain(view: Path) -> dict[str, float]:
    drop_caches()
    started = time.time()
    out = subprocess.run([sys.executable, "-c", PLAIN, str(view), PROMPT], check=True,
                         capture_output=True, text=True)
    inner = json.loads(out.stdout.strip().splitlines()[-1])
    return _timeline(started, inner["imports_started_at"] - started, inner, inner["token_at"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="2gb")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    model_dir, home, view = build(args.size)
    nbytes = sum(p.stat().st_size for p in view.glob("*.safetensors"))
    can_drop = drop_caches()
    tools = {"server cold": lambda: server_cold(model_dir, home),
             "server up": lambda: server_up(model_dir, home),
             "plain script": lambda: plain(view)}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in tools}
    names = list(tools)
    load_before = os.getloadavg()[0]
    for i in range(args.rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            r = tools[name]()
            results[name].append(r)
            print(f"round {i + 1} {name}: {r['token']:.2f} s", flush=True)
    body = report(results, nbytes, can_drop, args.rounds, load_before)
    if args.size != "2gb":
        body += (f"\n- Smoke run at --size {args.size}: the imports dominate at this size;"
                 " the benchmark's figures are those of --size 2gb.")
    print(body)
    if not args.no_write:
        _report.write_section("coldstart", "Cold start to the first token", body)


def _at(value: float) -> str:
    return "-" if value != value else f"{value:.2f}"  # NaN: the plain script has no such mark


def report(results: dict[str, list[dict[str, float]]], nbytes: int, can_drop: bool,
           rounds: int, load_before: float) -> str:
    med = {name: {k: statistics.median(r[k] for r in runs) for k in MARKS}
           for name, runs in results.items()}
    plain_total = med["plain script"]["token"]
    rows = [[name, f"{m['token']:.2f}", f"{m['token'] / plain_total:.2f}x", f"{m['up']:.2f}",
             f"{m['imports_started']:.2f} - {m['imports_done']:.2f}",
             _at(m["load_started"]), _at(m["built"]),
             f"{m['weights_done']:.2f}", f"{m['tokenizer_done']:.2f}"]
            for name, m in med.items()]
    headers = ["to the first token", "total s", "vs plain", "up at", "imports (from - to)",
               "load started at", "built (meta) at", "weights done at", "tokenizer done at"]
    notes = [
        f"Model: Llama, random bf16 weights, {nbytes / 1e9:.2f} GB of safetensors, in the cache"
        f" and not loaded. Medians of {rounds} rounds; page cache dropped before each:"
        f" {'yes' if can_drop else 'NO (not root)'}.",
        "Times are seconds from the start: of the server process (server cold), of the request"
        " (server up: the server started and settled first), of the script's process (plain"
        " script). \"up\": the port accepts (server), the script's first line runs (plain)."
        " `cachemesh serve` starts its worker before it imports its web stack, and the worker"
        " imports torch and transformers at once for the local model; once they are imported,"
        " a PRELOAD reads the weights into the loader's own buffers (load/prefetch.py), which"
        " the load adopts. \"weights\" is load_pretrained (reads and model construction"
        " overlap) for the server, from_pretrained for the script; \"built\": the server's model"
        " stands on the meta device (construction ends; the reads go on until \"weights"
        " done\"); the first token comes last.",
        "Server up: the server settled (its worker's RSS stopped growing) before the page"
        " cache was dropped, so the weights were already in the worker's own memory (not in"
        " the page cache, which the drop empties): this row measures the hand-over, the"
        " construction and the first token, not a disk read.",
        f"Load average before the run: {load_before:.1f} (a shared machine: figures are noisy).",
        "Goal: server cold <= 0.5x the plain script.",
    ]
    return _report.table(headers, rows) + "\n\n" + "\n".join(f"- {n}" for n in notes)


if __name__ == "__main__":
    main()
