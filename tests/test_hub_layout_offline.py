"""The real huggingface_hub and transformers, offline, reading cachemesh's hub/
view from a read-only bind mount, as a container would with

    -v $CACHEMESH_HOME/hub:/hf:ro -e HF_HUB_CACHE=/hf -e HF_HUB_OFFLINE=1

and the real huggingface_hub client downloading from the emulator (proof that
the emulator speaks the Hub's protocol). huggingface_hub reads HF_HUB_CACHE and
HF_HUB_OFFLINE at import time, so the offline programs run in their own process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import cachemesh
from cachemesh.caches import Caches
from tests.emulators.fixtures import HF_TOKEN
from tests.emulators.hf_hub import HfHubEmulator

ROOT = Path(__file__).resolve().parents[1]

# Builds a tiny random Llama with transformers and prints its logits for fixed ids.
BUILD = textwrap.dedent("""
    import json, sys, torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(sys.argv[1])
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "a", "b", "c"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(sys.argv[1])
    with torch.no_grad():
        logits = model(torch.tensor([[3, 4, 5]])).logits
    print(json.dumps(logits.flatten().tolist()))
""")

# Runs inside the container-like mount namespace: everything offline, nothing writable.
LOAD = textwrap.dedent("""
    import json, os, sys, torch
    repo = sys.argv[1]
    from huggingface_hub import hf_hub_download, scan_cache_dir, snapshot_download
    from transformers import AutoModelForCausalLM, AutoTokenizer
    snapshot = snapshot_download(repo)
    config = hf_hub_download(repo, "config.json")
    tagged = snapshot_download(repo, revision="v1")
    try:
        open(os.path.join(snapshot, "new-file"), "w")
        writable = True
    except OSError as exc:
        writable = exc.strerror
    model, info = AutoModelForCausalLM.from_pretrained(repo, output_loading_info=True)
    tokenizer = AutoTokenizer.from_pretrained(repo)
    ids = tokenizer("a b c", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model.eval()(torch.tensor([[3, 4, 5]])).logits
    scan = scan_cache_dir()
    print(json.dumps({
        "scanned": [r.repo_id for r in scan.repos],
        "scan_warnings": [str(w) for w in scan.warnings],
        "snapshot": snapshot, "config": config, "tagged": tagged, "writable": writable,
        "missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
        "ids": ids.tolist(), "logits": logits.flatten().tolist(),
    }))
""")

MOUNT = 'mount --bind -o ro "$HUB" "$TARGET" || exit 90; exec "$PY" -c "$LOAD" "$REPO"'


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, bytes], list[float]]:
    out = tmp_path_factory.mktemp("tiny-llama")
    proc = subprocess.run([sys.executable, "-c", BUILD, str(out)], capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert "model.safetensors" in files and "tokenizer.json" in files
    return files, json.loads(proc.stdout.strip().splitlines()[-1])


def _offline_env(hub_dir: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "CACHEMESH_"))}
    return {**keep, "HF_HUB_CACHE": hub_dir, "HF_HUB_OFFLINE": "1",
            "HF_HOME": hub_dir + "-home-unused", "HF_ENDPOINT": "http://127.0.0.1:9",
            "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
@pytest.mark.mount
def test_transformers_and_huggingface_hub_run_offline_from_a_read_only_mount(
        hub_caches: Caches, hf_env: HfHubEmulator, repo_id, tiny_llama, tmp_path: Path):
    files, expected_logits = tiny_llama
    commit = hf_env.commit(repo_id, files)
    hf_env.repos[("model", repo_id)].tag("v1")
    s = hub_caches.settings
    cachemesh.pull(f"hf://{repo_id}", settings=s)
    cachemesh.pull(f"hf://{repo_id}@v1", settings=s)
    hub = s.home / "hub"
    assert not [p for p in hub.rglob("*") if p.is_symlink()]

    target = tmp_path / "container-hf"
    target.mkdir()
    env = {**_offline_env(str(target)), "HUB": str(hub), "TARGET": str(target),
           "PY": sys.executable, "LOAD": LOAD, "REPO": repo_id}
    mounted = shutil.which("unshare") is not None
    if mounted:
        proc = subprocess.run(["unshare", "-m", "sh", "-c", MOUNT], env=env, capture_output=True,
                              text=True, timeout=240)
        mounted = proc.returncode != 90 and "Operation not permitted" not in proc.stderr
    if not mounted:  # no mount namespaces here: still prove the offline read, from the store itself
        env = {**_offline_env(str(hub))}
        proc = subprocess.run([sys.executable, "-c", LOAD, repo_id], env=env, capture_output=True,
                              text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    root = str(target if mounted else hub)
    folder = f"{root}/models--{repo_id.replace('/', '--')}"
    assert got["snapshot"] == got["tagged"] == f"{folder}/snapshots/{commit}"
    assert got["config"] == f"{folder}/snapshots/{commit}/config.json"
    assert got["missing"] == [] and got["unexpected"] == []
    assert got["scanned"] == [repo_id] and got["scan_warnings"] == []  # `hf cache ls` reads it too
    assert got["ids"] == [[3, 4, 5]]
    assert got["logits"] == pytest.approx(expected_logits, abs=1e-5)
    if mounted:
        assert got["writable"] == "Read-only file system"
        assert list(target.iterdir()) == []  # the mount did not leak out of its namespace
    else:
        pytest.skip("read offline from the store; bind mounts are not permitted here")


def test_the_real_client_downloads_from_the_emulator(hf_env: HfHubEmulator, repo_id,
                                                     tmp_path: Path):
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    files = {"config.json": b"{}", "model.safetensors": os.urandom(4096), "a/b.txt": b"b"}
    commit = hf_env.commit(repo_id, files)
    api = HfApi(endpoint=hf_env.url, token=False)
    assert api.model_info(repo_id).sha == commit
    assert sorted(f.path for f in api.list_repo_tree(repo_id, recursive=True)
                  if f.__class__.__name__ == "RepoFile") == sorted(files)
    path = snapshot_download(repo_id, endpoint=hf_env.url, cache_dir=tmp_path, token=False)
    got = {p.relative_to(path).as_posix(): p.read_bytes() for p in Path(path).rglob("*")
           if p.is_file()}
    assert got == files and Path(path).name == commit

    private, gated = repo_id + "-private", repo_id + "-gated"
    hf_env.add_repo(private, private=True, readers=[HF_TOKEN])
    hf_env.commit(private, {"x.txt": b"x"})
    hf_env.add_repo(gated, gated=True, readers=[HF_TOKEN])
    hf_env.commit(gated, {"x.txt": b"x"})
    kwargs = {"endpoint": hf_env.url, "cache_dir": tmp_path / "c2"}
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(private, "x.txt", token=False, **kwargs)
    assert Path(hf_hub_download(private, "x.txt", token=HF_TOKEN, **kwargs)).read_bytes() == b"x"
    with pytest.raises(GatedRepoError):
        hf_hub_download(gated, "x.txt", token=False, **kwargs)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "config.json", revision="nope", token=False, **kwargs)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(repo_id, "nope.txt", token=False, **kwargs)
    dataset = hf_env.commit(repo_id, {"d.csv": b"1,2"}, repo_type="dataset")
    assert api.dataset_info(repo_id).sha == dataset
    assert Path(hf_hub_download(repo_id, "d.csv", repo_type="dataset", token=False,
                                **kwargs)).read_bytes() == b"1,2"
