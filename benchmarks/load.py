"""Benchmark: loading a ~2 GB safetensors checkpoint into CPU memory, cold and warm.

    .venv/bin/python benchmarks/load.py [--rounds 3] [--peers .bench/venv-load/bin/python]

Two checkpoints, made once under ``.bench/load/`` (git-ignored):

- ``synthetic``: one file of 164 bf16 tensors shaped like a 1B decoder (2.0 GB);
- ``llama``: a transformers LlamaForCausalLM with TinyLlama's shapes cut to 20
  layers, random weights, bf16, saved with ``save_pretrained`` in 1 GB shards.

Tools, each measured in a fresh subprocess so that peak RSS is its own:

- ``dd``: ``dd bs=16M`` of the same files, the physical limit (cold: the disk;
  warm: the page cache copied into a 16 MiB buffer that never leaves the CPU
  caches, an upper bound no loader that fills fresh memory can reach);
- ``cachemesh``: ``load_state_dict`` (and ``load_pretrained`` for llama), in the
  project's virtualenv; ``cachemesh buffered`` is the same with ``direct_io=False``;
- peers, in their own virtualenv (``--peers``): ``safetensors.torch.load_file``
  (mmap and pread backends), runai-model-streamer at several concurrencies,
  fastsafetensors (``nogds``, CPU) and transformers ``from_pretrained``.

Measurement. Cold: page cache dropped (``sync; echo 3 > drop_caches``) before
every measurement. Warm: the files are read once right before. Tools run in a
rotated order each round, cold and warm alternate, and medians are reported.

This machine is a VM whose free memory is handed back to the host (free page
reporting); touching memory the host took back costs a fault on the host, and
2 GiB of such memory measured anywhere from 0.25 s to 4.7 s to touch. Every
worker therefore touches and frees 2.5x the checkpoint's size before its timer
starts (all tools alike, dd included), so that the loads measure the loaders
and not the host. Peak RSS is reset after that (``/proc/self/clear_refs``) and
read from ``VmHWM``; "RSS x" is peak RSS over the checkpoint's tensor bytes and
includes the interpreter and torch (about 0.22 GB here).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / ".bench" / "load"
RESULTS = DATA / "results.json"
PRELUDE_FACTOR = 2.5
RUNAI_CONCURRENCY = (4, 8, 16)


# --------------------------------------------------------------------------- worker side


def _touch_and_free(nbytes: int) -> None:
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_HUGEPAGE)
    view = ctypes.c_char.from_buffer(buf)
    ctypes.memset(ctypes.addressof(view), 1, nbytes)
    del view
    buf.close()


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(path.glob("*.safetensors"))


def _count(tensors: object) -> tuple[int, int]:
    """(count, bytes) of the loaded tensors, after reading one byte of every page.

    A loader may hand out tensors that map the file lazily (safetensors' mmap
    backend does); the timer stops only once every page is in memory. For
    tensors already in memory this costs the same few milliseconds for all.
    """
    import torch

    values = list(tensors.values()) if isinstance(tensors, dict) else list(tensors)
    total = 0
    for t in values:
        if t.numel():
            total += int(t.detach().reshape(-1).view(torch.uint8)[::4096].sum())
    return len(values), sum(t.numel() * t.element_size() for t in values)


def _run_tool(tool: str, path: Path) -> tuple[int, int]:
    """Load ``path`` with ``tool``; returns (tensor count, tensor bytes)."""
    if tool == "cachemesh":
        import cachemesh

        return _count(cachemesh.load_state_dict(path))
    if tool == "cachemesh verified":
        # A verified load (load/integrity.py), as a server's worker runs it with
        # CACHEMESH_SERVE_VERIFY_LOADS: every file hashed as its chunks land.
        from cachemesh.load import integrity, load_state_dict

        digests = json.loads(os.environ["CACHEMESH_BENCH_DIGESTS"])
        files = {f: integrity.Expected(sha, size, time.time()) for f, (sha, size) in
                 digests.items()}
        verifier = integrity.Verifier(files, full=True)
        tensors = verifier.run(lambda: load_state_dict(path))
        if sorted(verifier.verified) != sorted(files):
            raise SystemExit(f"verified {verifier.verified}, expected {sorted(files)}")
        return _count(tensors)
    if tool == "sha256":
        # What verifying costs at least: the files read and hashed on one core.
        import hashlib

        buf = bytearray(16 << 20)
        for f in _files(path):
            digest = hashlib.sha256()
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    digest.update(memoryview(buf)[:n])
        return 0, tensor_bytes(path)
    if tool == "cachemesh buffered":
        from cachemesh.load import load_state_dict

        return _count(load_state_dict(path, direct_io=False))
    if tool == "cachemesh load_pretrained":
        import cachemesh

        return _count(cachemesh.load_pretrained(path).state_dict())
    if tool.startswith("safetensors"):
        from safetensors.torch import load_file

        backend = "pread" if "pread" in tool else "mmap"
        out: dict = {}
        for f in _files(path):
            out.update(load_file(f, backend=backend) if backend == "pread" else load_file(f))
        return _count(out)
    if tool.startswith("runai"):
        from runai_model_streamer import SafetensorsStreamer

        out = {}
        with SafetensorsStreamer() as streamer:
            streamer.stream_files([str(f) for f in _files(path)])
            # Tensors are owned by the caller by default since 0.17 (no clone
            # needed); older releases reused their buffers and needed .clone().
            for name, tensor in streamer.get_tensors():
                out[name] = tensor
        return _count(out)
    if tool == "fastsafetensors":
        from fastsafetensors import SafeTensorsFileLoader, SingleGroup

        loader = SafeTensorsFileLoader(SingleGroup(), "cpu", nogds=True)
        loader.add_filenames({0: [str(f) for f in _files(path)]})
        buffers = loader.copy_files_to_device()
        out = {name: buffers.get_tensor(name) for name in loader.get_keys()}
        buffers.close()
        loader.close()
        return _count(out)
    if tool == "transformers from_pretrained":
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(path)
        return _count(model.state_dict())
    raise SystemExit(f"unknown tool {tool!r}")


def worker(tool: str, path: Path, size: int) -> None:
    if tool.startswith("runai"):
        os.environ["RUNAI_STREAMER_CONCURRENCY"] = tool.rsplit("=", 1)[1]
    if tool not in ("dd", "sha256"):
        # Imported before the timer, as a server has them loaded already.
        import torch  # noqa: F401

        if tool.startswith("cachemesh"):
            import cachemesh.load.pretrained
            import cachemesh.load.state_dict  # noqa: F401
        if "pretrained" in tool:
            # transformers imports lazily: its model code would otherwise load inside the timer.
            import transformers
            import transformers.models.llama.modeling_llama  # noqa: F401

            transformers.logging.set_verbosity_error()
    _touch_and_free(int(size * PRELUDE_FACTOR))
    if tool == "dd":
        seconds = 0.0
        for f in _files(path):
            done = subprocess.run(
                ["dd", f"if={f}", "of=/dev/null", "bs=16M"], capture_output=True, text=True
            )
            match = re.search(r"copied, ([0-9.]+) s", done.stderr)
            if done.returncode or not match:
                raise SystemExit(done.stderr)
            seconds += float(match.group(1))
        print(json.dumps({"seconds": seconds, "tensors": 0, "bytes": size}))
        return
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _status("VmRSS")
    start = time.perf_counter()
    count, nbytes = _run_tool(tool, path)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    print(
        json.dumps(
            {"seconds": seconds, "tensors": count, "bytes": nbytes, "peak": peak, "base": base}
        )
    )


# --------------------------------------------------------------------------- data


def make_synthetic(path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.empty(32000, 2048, dtype=torch.bfloat16)}
    for layer in range(18):
        p = f"model.layers.{layer}."
        for n in ("q", "k", "v", "o"):
            tensors[p + f"self_attn.{n}_proj.weight"] = torch.empty(
                2048, 2048, dtype=torch.bfloat16
            )
        for n, shape in (("gate", (5632, 2048)), ("up", (5632, 2048)), ("down", (2048, 5632))):
            tensors[p + f"mlp.{n}_proj.weight"] = torch.empty(*shape, dtype=torch.bfloat16)
        tensors[p + "input_layernorm.weight"] = torch.empty(2048, dtype=torch.bfloat16)
        tensors[p + "post_attention_layernorm.weight"] = torch.empty(2048, dtype=torch.bfloat16)
    tensors["model.norm.weight"] = torch.empty(2048, dtype=torch.bfloat16)
    for t in tensors.values():
        t.view(torch.int16).random_(-32768, 32767, generator=gen)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata={"format": "pt"})


def make_llama(path: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=20,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="1GB")


def ensure_data(only: list[str] | None = None) -> list[tuple[str, Path]]:
    synthetic = DATA / "synthetic" / "model.safetensors"
    llama = DATA / "llama"
    if not synthetic.exists() and (not only or "synthetic" in only):
        print("making", synthetic, flush=True)
        make_synthetic(synthetic)
    if not (llama / "config.json").exists() and (not only or "llama" in only):
        print("making", llama, flush=True)
        make_llama(llama)
    return [(n, p) for n, p in (("synthetic", synthetic), ("llama", llama))
            if not only or n in only]


def tensor_bytes(path: Path) -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from cachemesh.load import read_checkpoint

    return read_checkpoint(path).nbytes


# --------------------------------------------------------------------------- driver


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def warm_up(path: Path) -> None:
    """Read every file of the checkpoint once, so that all of it is in the page cache."""
    buf = bytearray(16 << 20)
    for f in sorted(p for p in (path.iterdir() if path.is_dir() else [path]) if p.is_file()):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def busy_cpus(seconds: float = 0.5) -> float:
    """How many CPUs were busy (not idle, not waiting for I/O) over ``seconds``."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields[:8]) - idle, sum(fields[:8])

    busy0, total0 = sample()
    time.sleep(seconds)
    busy1, total1 = sample()
    return (busy1 - busy0) / max(1, total1 - total0) * (os.cpu_count() or 1)


def wait_for_quiet(limit: float = 10.0) -> float:
    """Wait up to ``limit`` s for other work to leave the CPUs nearly idle; returns busy CPUs."""
    deadline = time.monotonic() + limit
    busy = busy_cpus()
    while busy > 0.3 and time.monotonic() < deadline:
        busy = busy_cpus()
    return busy


def measure(python: str, tool: str, path: Path, size: int, mode: str) -> dict:
    busy = wait_for_quiet()
    if mode == "cold":
        drop_caches()
    else:
        warm_up(path)
    cmd = [
        python,
        str(Path(__file__).resolve()),
        "--worker",
        tool,
        "--path",
        str(path),
        "--size",
        str(size),
    ]
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT / "src"),
        TRANSFORMERS_VERBOSITY="error",
        HF_HUB_OFFLINE="1",
        TQDM_DISABLE="1",
    )
    if not python.startswith(str(ROOT / ".venv")):
        env.pop("PYTHONPATH")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"{tool} on {path} failed:\n{done.stdout}\n{done.stderr[-3000:]}")
    return dict(json.loads(lines[-1]), busy_before=busy)


def gbps(size: int, seconds: float) -> float:
    return size / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peers", default=str(ROOT / ".bench" / "venv-load" / "bin" / "python"))
    parser.add_argument("--only", help="comma-separated checkpoint names (synthetic, llama)")
    parser.add_argument(
        "--tools",
        help="comma-separated tools to measure (a reduced run: dd and cachemesh are always"
        " in it; written to the section load-verified, not load), e.g. 'cachemesh verified,sha256'",
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print, do not update docs/benchmarks.md"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help=f"rebuild the report from the last run's {RESULTS.name}, measuring nothing",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, Path(args.path), args.size)
        return

    ours = str(ROOT / ".venv" / "bin" / "python")
    checkpoints = ensure_data(args.only.split(",") if args.only else None)
    common = [
        ("dd", ours),
        ("cachemesh", ours),
        ("cachemesh buffered", ours),
        ("safetensors mmap", args.peers),
        ("safetensors pread", args.peers),
        *[(f"runai c={c}", args.peers) for c in RUNAI_CONCURRENCY],
        ("fastsafetensors", args.peers),
    ]
    extra = [("cachemesh load_pretrained", ours), ("transformers from_pretrained", args.peers)]
    plan = {name: common + (extra if name == "llama" else []) for name, _ in checkpoints}
    if args.tools:
        wanted = {"dd", "cachemesh", *args.tools.split(",")}
        more = [("cachemesh verified", ours), ("sha256", ours)]
        plan = {name: [(t, py) for t, py in tools + more if t in wanted]
                for name, tools in plan.items()}
        os.environ["CACHEMESH_BENCH_DIGESTS"] = json.dumps(
            {str(f): digest for _, path in checkpoints for f, digest in digests(path).items()})
    sizes = {name: tensor_bytes(path) for name, path in checkpoints}
    if args.report_only and args.tools:
        raise SystemExit("--report-only rebuilds the full run's table; rerun a reduced one")
    if args.report_only:
        saved = json.loads(RESULTS.read_text())
        results = {tuple(k.split("|")): v for k, v in saved["results"].items()}
        body = report(
            checkpoints,
            plan,
            sizes,
            results,
            saved["rounds"],
            saved["elapsed"],
            tuple(saved["load"]),
        )
        # The section names the command that measured, with how it was written.
        sys.argv = [sys.argv[0], "--rounds", str(saved["rounds"])]
        body += (
            "\n\n(Measured by the command above with `--no-write`; this table was then written "
            "from its saved results with `--report-only`.)"
        )
        finish(body, args.no_write, {**saved, "sizes": sizes, "plan": tools_of(plan)})
        return
    results: dict[tuple[str, str, str], list[dict]] = {}
    started = time.perf_counter()
    load_before = os.getloadavg()[0]

    def save(elapsed: float, load: tuple[float, float]) -> None:
        RESULTS.write_text(
            json.dumps(
                {
                    "rounds": args.rounds,
                    "elapsed": elapsed,
                    "load": load,
                    "results": {"|".join(k): v for k, v in results.items()},
                }
            )
        )

    for rnd in range(args.rounds):
        for name, path in checkpoints:
            tools = plan[name]
            shift = rnd % len(tools)
            order = tools[shift:] + tools[:shift]
            for mode in ("cold", "warm") if rnd % 2 == 0 else ("warm", "cold"):
                for tool, python in order:
                    r = measure(python, tool, path, sizes[name], mode)
                    if tool != "dd" and r["bytes"] != sizes[name]:
                        raise SystemExit(
                            f"{tool} loaded {r['bytes']} bytes of {name}, expected {sizes[name]}"
                        )
                    results.setdefault((name, tool, mode), []).append(r)
                    save(time.perf_counter() - started, (load_before, os.getloadavg()[0]))
                    print(
                        f"round {rnd + 1} {name:9} {mode} {tool:30} {r['seconds']:.3f} s "
                        f"{gbps(sizes[name], r['seconds']):6.2f} GB/s  (other work before: "
                        f"{r['busy_before']:.2f} CPUs)",
                        flush=True,
                    )
    elapsed = time.perf_counter() - started
    load = (load_before, os.getloadavg()[0])
    save(elapsed, load)
    if args.tools:  # a reduced run: its own section; the full run's table stays
        finish_reduced(report(checkpoints, plan, sizes, results, args.rounds, elapsed, load),
                       args.no_write)
        return
    body = report(checkpoints, plan, sizes, results, args.rounds, elapsed, load)
    finish(body, args.no_write, {**json.loads(RESULTS.read_text()), "sizes": sizes,
                                 "plan": tools_of(plan)})


def tools_of(plan: dict[str, list[tuple[str, str]]]) -> dict[str, list[str]]:
    return {name: [tool for tool, _ in tools] for name, tools in plan.items()}


def finish(body: str, no_write: bool, saved: dict) -> None:
    """Print the report; unless ``no_write``, save the results to docs/results/load.json,
    draw the plot from them and write the section (plot first)."""
    if not no_write:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import _report

        _report.save_results("load", saved)
        link = _report.plot("load", "Loader GB/s against dd and the peers, cold and warm")
        body = f"{link}\n\n{body}" if link else body
    print(body)
    if not no_write:
        _report.write_section("load", "Loading safetensors", body)


def finish_reduced(body: str, no_write: bool) -> None:
    print(body)
    if not no_write:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import _report

        _report.write_section("load-verified", "Loading safetensors: verified loads", body)


def digests(path: Path) -> dict[str, tuple[str, int]]:
    """sha256 and size of each file of a checkpoint, computed once (kept beside the data):
    what the store would hand a verified load."""
    import hashlib

    saved = DATA / f"{path.name}.digests.json"
    if saved.exists():
        known = json.loads(saved.read_text())
        if all(str(f) in known and known[str(f)][1] == f.stat().st_size for f in _files(path)):
            return {f: tuple(v) for f, v in known.items()}
    out = {}
    for f in _files(path):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while block := fh.read(16 << 20):
                h.update(block)
        out[str(f)] = (h.hexdigest(), f.stat().st_size)
    saved.write_text(json.dumps(out))
    return out


def report(checkpoints, plan, sizes, results, rounds, elapsed, load) -> str:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _report

    every = [r for runs in results.values() for r in runs]
    quiet, total = sum(r["busy_before"] <= 0.3 for r in every), len(every)
    out = [
        f"{rounds} rounds; medians; GB/s = 10^9 tensor bytes per second; cold = page cache "
        "dropped before each run; every worker touches and frees 2.5x the checkpoint first "
        "(see benchmarks/load.py: this VM hands free memory back to its host). x dd and "
        "cachemesh faster x compare medians of the same run. "
        f"Whole run: {elapsed / 60:.1f} min; 1-minute load average {load[0]:.1f} before, "
        f"{load[1]:.1f} after. The machine's 2 cores are shared with other work: before each "
        "measurement the script waits up to 10 s for the CPUs to be nearly idle (other work "
        f"under 0.3 CPU); {quiet} of {total} measurements started that quiet.",
    ]
    for name, path in checkpoints:
        size = sizes[name]
        med = {
            (tool, mode): statistics.median(r["seconds"] for r in results[(name, tool, mode)])
            for tool, _ in plan[name]
            for mode in ("cold", "warm")
        }
        rows = []
        for tool, _ in plan[name]:
            row = [tool]
            for mode in ("cold", "warm"):
                s = med[(tool, mode)]
                row += [
                    f"{s:.3f}",
                    f"{gbps(size, s):.2f}",
                    f"{med[('dd', mode)] / s:.2f}",
                    f"{s / med[('cachemesh', mode)]:.2f}" if tool != "cachemesh" else "1",
                ]
            peaks = [
                r["peak"]
                for mode in ("cold", "warm")
                for r in results[(name, tool, mode)]
                if "peak" in r
            ]
            row.append(
                f"{statistics.median(peaks) / 1e9:.2f} ({statistics.median(peaks) / size:.2f}x)"
                if peaks
                else ""
            )
            rows.append(row)
        files = _files(path)
        out.append(f"\n### {name}: {size / 1e9:.2f} GB of tensors in {len(files)} file(s)\n")
        out.append(
            _report.table(
                [
                    "tool",
                    "cold s",
                    "cold GB/s",
                    "cold x dd",
                    "cachemesh faster x",
                    "warm s",
                    "warm GB/s",
                    "warm x dd",
                    "cachemesh faster x",
                    "peak RSS GB (x size)",
                ],
                rows,
            )
        )
        lines = []
        for tool in ("dd", "cachemesh", "cachemesh buffered", "cachemesh verified", "sha256"):
            for mode in ("cold", "warm"):
                if (name, tool, mode) not in results:
                    continue
                each = ", ".join(f"{r['seconds']:.3f}" for r in results[(name, tool, mode)])
                lines.append(f"{tool} {mode}, each round (s): {each}")
        out.append("\n" + "  \n".join(lines))
        if (name, "cachemesh verified", "cold") in results:
            out.append("\n" + verified_cost(name, results))
        if all((name, t, "cold") in results for t in ("safetensors mmap", "runai c=4")):
            out.append("\n" + goals(name, size, med, results))
    if any(t == "safetensors mmap" for name, _ in checkpoints for t, _ in plan[name]):
        out.append(NOTES)  # about the peers' goals: not for a reduced run
    return "\n".join(out)


def verified_cost(name: str, results: dict) -> str:
    """What verifying adds to a load: the ratio of the two in each round (they ran in
    the same round, alternated), and its median."""
    parts = []
    for mode in ("cold", "warm"):
        plain = results[(name, "cachemesh", mode)]
        checked = results[(name, "cachemesh verified", mode)]
        ratios = [c["seconds"] / p["seconds"] for p, c in zip(plain, checked, strict=True)]
        parts.append(f"{mode}: verified / plain = {statistics.median(ratios):.2f} (median of"
                     f" {len(ratios)} rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
    return f"Cost of a verified load ({name}): " + "; ".join(parts) + "."


def goals(name: str, size: int, med: dict, results: dict) -> str:
    """The loader's goals, met or missed, from this run's medians."""
    runai = min(med[(f"runai c={c}", "cold")] for c in RUNAI_CONCURRENCY)
    ours = results[(name, "cachemesh", "cold")] + results[(name, "cachemesh", "warm")]
    peak = statistics.median(r["peak"] for r in ours)
    above_base = statistics.median(r["peak"] - r["base"] for r in ours)
    rows = [
        ("cold >= 0.9x dd", med[("dd", "cold")] / med[("cachemesh", "cold")], 0.9),
        ("cold >= 1.2x best runai-model-streamer", runai / med[("cachemesh", "cold")], 1.2),
        (
            "warm >= 3x safetensors load_file (default mmap backend)",
            med[("safetensors mmap", "warm")] / med[("cachemesh", "warm")],
            3.0,
        ),
        (
            "warm >= 3x safetensors load_file (pread backend)",
            med[("safetensors pread", "warm")] / med[("cachemesh", "warm")],
            3.0,
        ),
        ("warm >= 0.6x dd", med[("dd", "warm")] / med[("cachemesh", "warm")], 0.6),
    ]
    if ("cachemesh load_pretrained", "cold") in med:
        for mode in ("cold", "warm"):
            rows.append(
                (
                    f"load_pretrained vs from_pretrained, {mode} (no goal set)",
                    med[("transformers from_pretrained", mode)]
                    / med[("cachemesh load_pretrained", mode)],
                    0,
                )
            )
    table = [
        [goal, f"{value:.2f}x", ("met" if value >= bar else "missed") if bar else ""]
        for goal, value, bar in rows
    ]
    table.append(
        [
            "peak RSS <= 1.1x checkpoint (whole process)",
            f"{peak / size:.2f}x",
            "met" if peak / size <= 1.1 else "missed",
        ]
    )
    table.append(
        [
            "peak RSS above the process before loading",
            f"{above_base / size:.2f}x",
            "met" if above_base / size <= 1.1 else "missed",
        ]
    )
    return _table(["goal (" + name + ")", "measured", ""], table)


def _table(headers, rows) -> str:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _report

    return _report.table(headers, rows)


NOTES = """
Notes on the goals, from measurements on this machine:

- safetensors 0.8's `load_file` (default mmap backend) no longer copies on the CPU: its
  tensors map the file copy-on-write, so a warm "load" is page-table work over the page
  cache, and its peak RSS counts those shared file pages. cachemesh reads into memory it
  owns (anonymous, huge pages), which costs the kernel zeroing each page and then a copy;
  no copying loader can be 3x a zero-copy one. The pread backend is the copying comparison.
- dd warm copies the page cache into one 16 MiB buffer that stays in the CPU caches and
  never faults; a loader fills 2 GB of fresh memory (fault, zero, copy), which is bounded
  by memory bandwidth, shared here with other work on the host.
- Warm runs are the noisiest: the same tool varied up to 3x between rounds while other
  work held the CPUs (see each round above); compare within a round where in doubt.
- Peak RSS includes the interpreter and torch (about 0.22 GB before anything is loaded);
  the second RSS row subtracts what the process held just before the load.
"""


if __name__ == "__main__":
    main()
