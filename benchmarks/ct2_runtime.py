"""The ctranslate2 runtime's own cost: streaming through it against CTranslate2 alone.

A user who drives CTranslate2 by hand calls ``Generator.generate_tokens`` and
decodes the ids at the end. The runtime (``runtimes/ctranslate2.py``) adds, per
request, tokenizing and checking the payload, and per token, incremental
detokenization and stop-string matching; this measures that difference on the
same ``Generator`` object (same weights, same threads), greedy, one prompt at a
time, the two alternating prompt by prompt. With ``--server`` it also asks a
real ``cachemesh serve`` over KServe V2 (``text_input``), which adds the HTTP
round trip and the worker process.

The model is benchmarks/convert.py's Llama (random weights, byte-level BPE
trained on the standard library), converted with ``cachemesh convert --to ct2
--quantization int8``; ``--size small`` builds a narrower one for a smoke run.
The physical limit: batch-1 decoding reads every weight once per token, so
memory bandwidth / weight bytes bounds tokens/s.

Run it alone on the machine: ``flock /tmp/cachemesh-bench.lock python benchmarks/ct2_runtime.py``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report
import convert as convert_bench

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench" / "ct2_runtime"
THREADS = 2
SMALL = {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 2048}


def build(size: str) -> Path:
    if size == "full":
        model = ROOT / ".bench" / "convert" / "model"  # shared with benchmarks/convert.py
    else:
        convert_bench.CONFIG = SMALL
        convert_bench.VOCAB = 4000
        model = BENCH / "model-small"
    model.parent.mkdir(parents=True, exist_ok=True)
    convert_bench.build_model(model)
    return model


def converted(model: Path, size: str) -> Path:
    from cachemesh.caches import Caches
    from cachemesh.config import Settings
    from cachemesh.convert import Conversions, make_options

    caches = Caches(Settings.from_env({"CACHEMESH_HOME": str(BENCH / f"home-{size}")}))
    return Conversions(caches).convert(str(model), make_options("ct2", quantization="int8")).view


def raw(runtime, prompt: str, new: int) -> tuple[float, float, int]:
    """CTranslate2 by hand: tokenize, generate_tokens, decode the ids at the end."""
    t = time.perf_counter()
    tokenizer = runtime.tokenizer
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(prompt)["input_ids"])
    first, ids = None, []
    for step in runtime.generator.generate_tokens(tokens, max_length=new, sampling_topk=1,
                                                  end_token=runtime.end_ids):
        if first is None:
            first = time.perf_counter()
        ids.append(step.token_id)
    tokenizer.decode(ids, skip_special_tokens=True)
    return first - t, time.perf_counter() - t, len(ids)


def through_runtime(runtime, prompt: str, new: int) -> tuple[float, float, int]:
    t = time.perf_counter()
    first, last = None, None
    for chunk in runtime.stream({"kind": "completion", "prompt": prompt, "max_tokens": new,
                                 "temperature": 0}):
        if first is None and chunk["text"]:
            first = time.perf_counter()
        last = chunk
    end = time.perf_counter()
    return (first or end) - t, end - t, last["completion_tokens"]


def through_server(client, prompt: str, new: int) -> tuple[float, float, int]:
    import orjson

    body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1],
                        "data": [prompt]}], "parameters": {"max_tokens": new, "temperature": 0}}
    t = time.perf_counter()
    r = client.post("/v2/models/llm/infer", content=orjson.dumps(body))
    r.raise_for_status()
    return float("nan"), time.perf_counter() - t, new  # no streaming over V2: no TTFT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["full", "small"], default="full")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64, help="New tokens per prompt.")
    parser.add_argument("--server", action="store_true", help="Also ask cachemesh serve (V2).")
    parser.add_argument("--no-write", action="store_true", help="Do not update docs/benchmarks.md.")
    args = parser.parse_args()
    load_before = os.getloadavg()

    model = build(args.size)
    view = converted(model, args.size)
    weights = (view / "model.bin").stat().st_size
    bandwidth = convert_bench.memory_bandwidth()

    from cachemesh.runtimes import ModelSettings, runtime_class

    runtime = runtime_class("ctranslate2")(
        ModelSettings(name="llm", path=view, parameters={"threads": THREADS}))
    runtime.load()
    engines = {"CTranslate2 by hand": lambda p: raw(runtime, p, args.tokens),
               "cachemesh runtime (stream)": lambda p: through_runtime(runtime, p, args.tokens)}
    server = None
    if args.server:
        server = start_server(view)
        engines["cachemesh serve, V2 REST"] = lambda p: through_server(server.client, p,
                                                                      args.tokens)
    for prompt in convert_bench.PROMPTS[:1]:  # warm-up: first-call costs are not the steady state
        for run in engines.values():
            run(prompt)

    results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in engines}
    names = list(engines)
    for rep in range(args.repeats):
        for i, prompt in enumerate(convert_bench.PROMPTS):
            shift = (rep + i) % len(names)
            for name in names[shift:] + names[:shift]:  # rotate the order
                results[name].append(engines[name](prompt))
    if server is not None:
        server.stop()
    runtime.unload()

    rows = []
    base = _report.median([n / total for _, total, n in results[names[0]]])
    base_total = _report.median([total / n for _, total, n in results[names[0]]])
    for name in names:
        rate = _report.median([n / total for _, total, n in results[name]])
        per_token = _report.median([total / n for _, total, n in results[name]])
        ttfts = [f for f, _, _ in results[name] if not math.isnan(f)]
        rows.append([name, f"{_report.median(ttfts) * 1000:.1f}" if ttfts else "-",
                     f"{rate:.1f}", f"{rate / base:.2f}x",
                     f"{(per_token - base_total) * 1e6:+.0f}"])
    limit = bandwidth / weights
    load_after = os.getloadavg()
    body = (
        f"Model: `{model.name}` converted to CTranslate2 int8 ({weights / 2**20:.1f} MiB of"
        f" weights); greedy, {args.tokens} new tokens (or fewer at an end token) for each of"
        f" {len(convert_bench.PROMPTS)} prompts, {THREADS} threads, {args.repeats} repetitions,"
        " engines alternating in a rotating order; medians.\n"
        f"Memory read bandwidth in the same run: {bandwidth / 1e9:.1f} GB/s, so at most"
        f" {limit:.0f} tokens/s at batch 1.\n"
        f"Load average before: {' '.join(f'{x:.2f}' for x in load_before)},"
        f" after: {' '.join(f'{x:.2f}' for x in load_after)}.\n\n"
        + _report.table(["path", "first text ms", "tokens/s", "vs by hand",
                         "added per token us"], rows)
        + "\n\n\"added per token\" is the median time per token less CTranslate2-by-hand's:"
        " what the runtime's detokenization, stop-string checks and (for the server) HTTP and"
        " the worker cost.\n"
    )
    print(body)
    if not args.no_write:
        _report.write_section("ct2_runtime", "The ctranslate2 runtime's overhead", body)


def start_server(view: Path):
    import dataclasses
    import socket
    import threading

    import httpx

    from cachemesh.config import Settings
    from cachemesh.serve.adapters.server import make_server
    from cachemesh.serve.core.registry import ModelSpec

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = Settings.from_env({"CACHEMESH_HOME": str(BENCH / "serve-home"),
                              "CACHEMESH_SERVE_WORKER_THREADS": str(THREADS)})
    settings = dataclasses.replace(base, serve=dataclasses.replace(base.serve, port=port,
                                                                   workers=1))
    server = make_server(settings, [ModelSpec(name="llm", source=str(view), eager=True)])
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if client.get("/v2/health/ready").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)

    class Running:
        def stop(self) -> None:
            client.close()
            server.should_exit = True
            thread.join(30)

    running = Running()
    running.client = client  # type: ignore[attr-defined]
    return running


if __name__ == "__main__":
    main()
