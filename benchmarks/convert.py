"""Conversion and acceleration: transformers (torch, CPU) against CTranslate2 int8.

Builds a Llama-architecture model with random weights (about 190M parameters,
float32, save_pretrained) and a byte-level BPE tokenizer trained offline with
the `tokenizers` library on the Python standard library's source, all under
``.bench/convert/``. Then, in one run:

1. ``cachemesh convert MODEL --to ct2 --quantization int8`` (and without
   quantization, float32) into a fresh store: the conversion job's time, and
   the time of converting again (a cache lookup, in a new process);
2. load time: ``LlamaForCausalLM.from_pretrained`` against
   ``ctranslate2.Generator`` (page cache warm for both, median of 3);
3. greedy generation of NEW_TOKENS tokens for each prompt, one prompt at a
   time: transformers ``generate`` (time to first token through a streamer)
   against CTranslate2 ``generate_tokens`` (first token = first yielded), and
   a batch of all prompts (transformers ``generate`` with left padding against
   ``generate_batch``). Engines alternate prompt by prompt in a rotating
   order (the machine is shared: its load drifts by the minute); medians.

The physical limit: decoding one token reads every weight once, so memory
bandwidth / weight bytes bounds tokens/s at batch 1; the bandwidth (a sum over
a 1 GiB array) is measured in the same run.

Run it alone on the machine: ``flock /tmp/cachemesh-bench.lock python benchmarks/convert.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench" / "convert"
NEW_TOKENS = 64
THREADS = 2
CONFIG = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12,
          "num_attention_heads": 16, "num_key_value_heads": 16, "max_position_embeddings": 2048}
VOCAB = 16000
PROMPTS = [
    "def read_config(path):\n    \"\"\"Read the configuration file and",
    "The cache keeps every file once, named by the sha256 of its bytes, so that",
    "import os\nimport sys\n\nclass Loader:\n    def __init__(self, root):",
    "Return a list of the lines in the string, breaking at line boundaries.",
]


def corpus(limit_bytes: int = 12_000_000) -> list[str]:
    """Text to train the tokenizer on: the standard library's own source."""
    import sysconfig

    texts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        texts.append(text)
        size += len(text)
        if size > limit_bytes:
            break
    return texts


def build_model(directory: Path) -> None:
    if (directory / "model.safetensors").exists() or \
            (directory / "model.safetensors.index.json").exists():
        return
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    t0 = time.monotonic()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>", pad_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False, **CONFIG)
    model = LlamaForCausalLM(config).eval()
    tmp = directory.with_suffix(".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(directory)
    print(f"built {directory} in {time.monotonic() - t0:.0f} s", file=sys.stderr)


def memory_bandwidth() -> float:
    """Bytes per second read by a sum over a 1 GiB float32 array (best of 3)."""
    import numpy as np

    a = np.ones(256 * 1024**2, dtype=np.float32)
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        a.sum()
        best = max(best, a.nbytes / (time.perf_counter() - t))
    return best


def convert_cli(model: Path, home: Path, *extra: str) -> tuple[float, dict]:
    env = {**os.environ, "CACHEMESH_HOME": str(home)}
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "cachemesh", "convert", str(model), "--to", "ct2",
                           "--json", *extra], capture_output=True, text=True, env=env, check=True)
    return time.monotonic() - t, json.loads(proc.stdout)


def job_seconds(home: Path, job_id: str) -> dict:
    from cachemesh.caches import Caches
    from cachemesh.config import Settings
    from cachemesh.jobs import Jobs

    job = Jobs(Caches(Settings.from_env({"CACHEMESH_HOME": str(home)})).store).get(job_id)
    return {"job_s": job.duration, "convert_s": job.result["convert_seconds"],
            "bytes": job.result["bytes"]}


class FirstToken:
    """A transformers streamer that notes when the first new token arrives."""

    def __init__(self) -> None:
        self.calls = 0
        self.first: float | None = None

    def put(self, value: object) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:  # call 1 is the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def run_hf(model, tokenizer, prompt: str,
           new_tokens: int = NEW_TOKENS) -> tuple[float, float, int]:
    import torch

    ids = tokenizer(prompt, return_tensors="pt")
    streamer = FirstToken()
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, streamer=streamer, pad_token_id=2)
    total = time.perf_counter() - t
    n = out.shape[1] - ids["input_ids"].shape[1]
    return streamer.first - t, total, n


def run_ct2(generator, tokenizer, prompt: str,
            new_tokens: int = NEW_TOKENS) -> tuple[float, float, int]:
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(prompt)["input_ids"])
    t = time.perf_counter()
    first, n = None, 0
    for _ in generator.generate_tokens(tokens, max_length=new_tokens, min_length=new_tokens,
                                       sampling_topk=1):
        if first is None:
            first = time.perf_counter()
        n += 1
    return first - t, time.perf_counter() - t, n


def batch_hf(model, tokenizer) -> tuple[float, int]:
    import torch

    tokenizer.padding_side = "left"
    ids = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=2)
    return time.perf_counter() - t, (out.shape[1] - ids["input_ids"].shape[1]) * len(PROMPTS)


def batch_ct2(generator, tokenizer) -> tuple[float, int]:
    batch = [tokenizer.convert_ids_to_tokens(tokenizer(p)["input_ids"]) for p in PROMPTS]
    t = time.perf_counter()
    results = generator.generate_batch(batch, max_length=NEW_TOKENS, min_length=NEW_TOKENS,
                                       sampling_topk=1, include_prompt_in_result=False)
    return time.perf_counter() - t, sum(len(r.sequences_ids[0]) for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="Repetitions (default 5).")
    parser.add_argument("--no-write", action="store_true", help="Do not update docs/benchmarks.md.")
    args = parser.parse_args()
    load_before = os.getloadavg()

    model_dir = BENCH / "llama-190m"
    BENCH.mkdir(parents=True, exist_ok=True)
    build_model(model_dir)

    import shutil

    import ctranslate2
    import torch
    import transformers
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(THREADS)
    home = BENCH / "home"
    shutil.rmtree(home, ignore_errors=True)

    # 1. conversion (first run converts; the second is a lookup in a new process)
    conv = {}
    for quant in ("int8", None):
        extra = ("--quantization", quant) if quant else ()
        wall, result = convert_cli(model_dir, home, *extra)
        again, hit = convert_cli(model_dir, home, *extra)
        assert hit["cached"] and hit["view"] == result["view"]
        conv[quant or "float32"] = {"wall_s": wall, "hit_s": again, "view": result["view"],
                                    **job_seconds(home, result["job"])}
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))

    # 2. load times (warm page cache: a first round, not counted, reads the files),
    # and load + the first generated token: transformers maps its weights lazily,
    # so its constructor alone would flatter it.
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    names = ("transformers", "ct2-int8", "ct2-float32")
    loads: dict[str, list[float]] = {k: [] for k in names}
    ready: dict[str, list[float]] = {k: [] for k in names}

    def load_hf():
        return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def load_ct2(quant: str):
        return ctranslate2.Generator(conv[quant]["view"], device="cpu", compute_type=quant,
                                     intra_threads=THREADS, inter_threads=1)

    loaders = {"transformers": load_hf, "ct2-int8": lambda: load_ct2("int8"),
               "ct2-float32": lambda: load_ct2("float32")}
    for rep in range(args.repeats + 1):
        for name in names if rep % 2 == 0 else reversed(names):
            t = time.perf_counter()
            obj = loaders[name]()
            loaded = time.perf_counter() - t
            first = (run_hf if name == "transformers" else run_ct2)(obj, tokenizer, PROMPTS[0],
                                                                     new_tokens=1)[0]
            if rep:
                loads[name].append(loaded)
                ready[name].append(loaded + first)
            del obj

    # 3. generation: engines alternate prompt by prompt, in a rotating order
    engines = {name: loaders[name]() for name in names}
    single = {k: {"ttft": [], "tps": []} for k in engines}
    batch = {k: [] for k in engines}
    for rep in range(args.repeats):
        for i, prompt in enumerate(PROMPTS):
            shift = (rep * len(PROMPTS) + i) % len(names)
            for name in names[shift:] + names[:shift]:
                run = run_hf if name == "transformers" else run_ct2
                ttft, total, n = run(engines[name], tokenizer, prompt)
                assert n == NEW_TOKENS, (name, n)
                single[name]["ttft"].append(ttft)
                single[name]["tps"].append(n / total)
        for name in names if rep % 2 == 0 else reversed(names):
            seconds, n = (batch_hf if name == "transformers" else batch_ct2)(engines[name],
                                                                           tokenizer)
            assert n == NEW_TOKENS * len(PROMPTS), (name, n)
            batch[name].append(n / seconds)
        print(f"repetition {rep + 1}/{args.repeats} done", file=sys.stderr)
    load_after = os.getloadavg()
    bandwidth = memory_bandwidth()

    med = _report.median
    base_tps = med(single["transformers"]["tps"])
    base_ttft = med(single["transformers"]["ttft"])
    base_batch = med(batch["transformers"])
    int8_bytes = Path(conv["int8"]["view"], "model.bin").stat().st_size
    f32_bytes = Path(conv["float32"]["view"], "model.bin").stat().st_size
    limit = {"transformers": bandwidth / weights, "ct2-int8": bandwidth / int8_bytes,
             "ct2-float32": bandwidth / f32_bytes}
    rows = []
    best_tps = max(single["transformers"]["tps"])
    best_ttft = min(single["transformers"]["ttft"])
    best_batch = max(batch["transformers"])
    for name in engines:
        tps, ttft, btp = med(single[name]["tps"]), med(single[name]["ttft"]), med(batch[name])
        ttfts, tpss, btps = single[name]["ttft"], single[name]["tps"], batch[name]
        rows.append([
            name,
            f"{ttft * 1000:.0f} ({min(ttfts) * 1000:.0f}–{max(ttfts) * 1000:.0f})",
            f"{base_ttft / ttft:.2f}x / {best_ttft / min(ttfts):.2f}x",
            f"{tps:.1f} ({min(tpss):.1f}–{max(tpss):.1f})",
            f"{tps / base_tps:.2f}x / {max(tpss) / best_tps:.2f}x",
            f"{limit[name]:.0f}",
            f"{btp:.1f} ({min(btps):.1f}–{max(btps):.1f})",
            f"{btp / base_batch:.2f}x / {max(btps) / best_batch:.2f}x",
        ])
    params = sum(p.numel() for p in engines["transformers"].parameters())
    gen_table = _report.table(
        ["engine", "TTFT ms", "TTFT speed-up (median / best)", "tokens/s (batch 1)",
         "speed-up (median / best)", "limit tokens/s (bandwidth / weights)",
         f"tokens/s (batch {len(PROMPTS)})", "speed-up (median / best)"], rows)
    conv_rows = []
    for quant in ("int8", "float32"):
        c = conv[quant]
        conv_rows.append([f"ct2 {quant}", f"{c['convert_s']:.1f}", f"{c['job_s']:.1f}",
                          f"{c['wall_s']:.1f}", f"{c['hit_s']:.2f}",
                          _report_size(c["bytes"])])
    conv_table = _report.table(
        ["conversion", "converter s", "job s (+ store)", "command s (incl. pull, start-up)",
         "again: lookup s (new process)", "result size"], conv_rows)
    load_table = _report.table(
        ["engine", "load s (warm page cache)", "load + first token s"],
        [[k, f"{med(loads[k]):.2f}", f"{med(ready[k]):.2f}"] for k in names])
    body = f"""
Model: Llama architecture, random weights, {params / 1e6:.0f}M parameters
(hidden {CONFIG['hidden_size']}, {CONFIG['num_hidden_layers']} layers,
{CONFIG['num_attention_heads']} heads, intermediate {CONFIG['intermediate_size']},
vocabulary {len(tokenizer)}: a BPE tokenizer trained offline on the Python standard
library), float32 safetensors of {_report_size(weights)}. Greedy decoding of exactly
{NEW_TOKENS} new tokens for each of {len(PROMPTS)} prompts, {THREADS} threads for both
engines, {args.repeats} repetitions with the engines alternating prompt by prompt;
medians over all prompts and repetitions. transformers {transformers.__version__} / torch
{torch.__version__} (float32) against CTranslate2 {ctranslate2.__version__}
(`generate_tokens` at batch 1, `generate_batch` for the batch).
Memory read bandwidth measured in the same run: {bandwidth / 1e9:.1f} GB/s.
Load average (1, 5, 15 min) before: {load_before[0]:.2f} {load_before[1]:.2f}
{load_before[2]:.2f}, after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}
(other engineers' jobs share this 2-core machine; this script held the benchmark lock).

{gen_table}

{conv_table}

{load_table}

Load times are the constructors' wall time with the files in the page cache;
"load + first token" adds generating one token for the first prompt, since
transformers 5 maps the safetensors file and reads pages only as the first
forward pass touches them, while CTranslate2 reads `model.bin` into its own
buffers up front (float32: 4x the bytes of int8).
Cells show the median and, in brackets, the range over all prompts and repetitions.
Speed-ups are against transformers in the same run, as the ratio of medians and
the ratio of best runs (fastest against fastest: the least disturbed by other
processes on the machine; torch's threads suffer most from a busy CPU, so the
median ratio overstates what a quiet machine would show). "limit" is the
memory-bandwidth bound of batch-1 decoding for that engine's weight bytes.
A conversion run again is a lookup by identity: no job and no converter run; its
time is a new `cachemesh` process's start-up and hashing nothing.
"""
    print(body)
    if not args.no_write:
        _report.write_section("convert", "Conversion and acceleration", body)


def _report_size(n: int) -> str:
    from cachemesh.config import format_size

    return format_size(n)


if __name__ == "__main__":
    main()
