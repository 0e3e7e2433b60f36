"""Loading safetensors straight onto a GPU: cachemesh against safetensors.

Run on a machine with a CUDA device (it exits cleanly without one):

    python benchmarks/load_gpu.py [--size-gb 4] [--rounds 3] [--out FILE]

Writes a synthetic multi-tensor bf16 checkpoint, then alternates, per round,
cold (page cache dropped, where permitted) and warm loads with:
cachemesh ``load_state_dict(device="cuda")`` (parallel reads, pinned reused
staging buffers, asynchronous copies) and ``safetensors.torch.load_file(device="cuda")``;
plus ``dd`` of the same file as the disk's limit. Each load ends with
``torch.cuda.synchronize()``. The table goes to docs/benchmarks.md (section
"load-gpu"), or to ``--out`` when the docs are not writable there.
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _report  # noqa: E402


def write_checkpoint(path: Path, size_gb: float) -> int:
    import torch
    from safetensors.torch import save_file

    n = max(1, int(size_gb * 1e9 / (64 * 1024 * 1024 * 2)))
    tensors = {f"layer.{i}.weight": torch.randn(8192, 8192, dtype=torch.bfloat16) for i in range(n)}
    save_file(tensors, str(path))
    return path.stat().st_size


def timed(fn) -> float:
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    del out
    return elapsed


def dd_seconds(path: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M"], check=True,
                   capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gb", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/cachemesh-gpu-bench"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return
    from safetensors.torch import load_file

    from cachemesh.load import load_state_dict

    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / "model.safetensors"
    size = write_checkpoint(path, args.size_gb) if not path.exists() else path.stat().st_size
    torch.zeros(1, device="cuda")  # CUDA context outside the timings

    tools = {
        "cachemesh load_state_dict(device='cuda')": lambda: load_state_dict(path, device="cuda"),
        "safetensors load_file(device='cuda')": lambda: load_file(str(path), device="cuda"),
    }
    results: dict[str, dict[str, list[float]]] = {t: {"cold": [], "warm": []} for t in tools}
    dd: dict[str, list[float]] = {"cold": [], "warm": []}
    can_drop = True
    for _ in range(args.rounds):
        for name, fn in tools.items():
            can_drop = _report.drop_page_cache() and can_drop
            results[name]["cold"].append(timed(fn))
            results[name]["warm"].append(timed(fn))
        can_drop = _report.drop_page_cache() and can_drop
        dd["cold"].append(dd_seconds(path))
        dd["warm"].append(dd_seconds(path))

    gb = size / 1e9
    rows = []
    for mode in ("cold", "warm"):
        limit = gb / _report.median(dd[mode])
        rows.append([f"dd (limit), {mode}", f"{limit:.2f}", "1.00x", ""])
        base = gb / _report.median(results["safetensors load_file(device='cuda')"][mode])
        for name in tools:
            rate = gb / _report.median(results[name][mode])
            rows.append([f"{name}, {mode}", f"{rate:.2f}", f"{rate / limit:.2f}x",
                         f"{rate / base:.2f}x"])
    body = (
        f"Device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}. Checkpoint: "
        f"{gb:.2f} GB, bf16, {size // (8192 * 8192 * 2)} tensors of 8192x8192, one file. "
        f"{args.rounds} rounds, medians; cold = page cache dropped before the load"
        f"{'' if can_drop else ' (NOT permitted here: cold equals warm)'}. "
        "Each load includes `torch.cuda.synchronize()`.\n\n"
        + _report.table(["tool", "GB/s", "vs dd", "vs safetensors"], rows)
    )
    print(body)
    if args.out is not None:
        args.out.write_text(body + "\n")
    else:
        _report.write_section("load-gpu", "Loading onto a GPU", body)


if __name__ == "__main__":
    main()
