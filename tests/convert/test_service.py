"""The conversion service: identity, cache hits, locking, failures, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cachemesh.caches import Caches, make_spec
from cachemesh.config import Settings
from cachemesh.convert import BUCKET, Conversions, ModelInput, make_options, read_manifest
from cachemesh.convert.identity import identity_document, identity_of
from cachemesh.errors import ConversionError, InvalidInputError
from cachemesh.jobs import FAILED, SUCCEEDED, Jobs
from tests.conftest import model_files


def cm(*args: str) -> subprocess.CompletedProcess:
    """The command line in a new process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "cachemesh", *args], capture_output=True,
                          text=True, env=os.environ.copy(), timeout=120, check=False)


class Ran:
    def __init__(self, result) -> None:  # noqa: ANN001 - click's Result
        self.returncode, self.stdout, self.stderr = result.exit_code, result.stdout, result.stderr


def cli(*args: str) -> Ran:
    """The command line in this process (click's runner): same code and exit codes,
    without paying for a new interpreter importing torch."""
    from click.testing import CliRunner

    from cachemesh.cli import main

    return Ran(CliRunner().invoke(main, list(args), catch_exceptions=False))


def test_convert_stores_a_result_and_converting_again_is_a_lookup(caches: Caches, make_tree,
                                                                   fake_converter):
    origin = make_tree("m", model_files())
    conversions = Conversions(caches)
    first = conversions.convert(str(origin), make_options("fake"))
    assert fake_converter.runs == 1 and not first.cached and first.job
    assert first.view == caches.store.views.dir(BUCKET, first.cache)
    assert (first.view / "done.txt").read_text() == "none"
    manifest = read_manifest(first.view)
    assert manifest["identity"] == first.identity
    assert manifest["inputs"] == sorted([p, caches.store.file_rows("m")[p]["sha256"]]
                                        for p in model_files())
    assert caches.get(first.cache).status == "Available"

    again = conversions.convert(str(origin), make_options("fake"))
    assert fake_converter.runs == 1, "the converter ran again"
    assert again.cached and again.job is None
    assert (again.view, again.identity) == (first.view, first.identity)
    # One job: the lookup did no work.
    assert [j.status for j in Jobs(caches.store).list()] == [SUCCEEDED]
    # No staging left behind.
    assert not any((caches.store.blobs.tmp_dir / "convert").iterdir())


def test_the_input_can_be_a_view_directory_or_a_cache_name(caches: Caches, make_tree,
                                                            fake_converter):
    origin = make_tree("m", model_files())
    view = caches.ensure(make_spec(name="mine", source=str(origin))).view
    conversions = Conversions(caches)
    by_view = conversions.convert(str(view), make_options("fake"))
    by_name = conversions.convert("mine", make_options("fake"))
    assert by_view.input_cache == by_name.input_cache == "mine"
    assert by_name.cached and fake_converter.runs == 1
    # No second input cache was made from the view.
    assert sorted(c.name for c in caches.list("default")) == ["mine"]


def test_identity_depends_on_input_bytes_options_and_converter(caches: Caches, make_tree,
                                                               fake_converter):
    conversions = Conversions(caches)
    a = conversions.convert(str(make_tree("a", model_files(seed=1))), make_options("fake"))
    b = conversions.convert(str(make_tree("b", model_files(seed=2))), make_options("fake"))
    a_q = conversions.convert(str(make_tree("a", model_files(seed=1))),
                              make_options("fake", quantization="int8"))
    assert len({a.identity, b.identity, a_q.identity}) == 3
    assert fake_converter.runs == 3
    # A new converter revision gives a new identity for the same input and options.
    files = {p: r["sha256"] for p, r in caches.store.file_rows("a").items()}
    model = ModelInput("a", "", caches.view("a"), files)
    converter = fake_converter()
    doc = identity_document(converter, make_options("fake"), model)
    assert identity_of(doc) == a.identity
    fake_converter.revision = 2
    try:
        assert identity_of(identity_document(converter, make_options("fake"), model)) != a.identity
    finally:
        fake_converter.revision = 1


def test_identity_is_the_same_in_two_stores(tmp_path: Path, llama):
    origin, _, _ = llama
    results = []
    for home in ("home-a", "home-b"):
        caches = Caches(Settings.from_env({"CACHEMESH_HOME": str(tmp_path / home)}))
        results.append(Conversions(caches).convert(str(origin), make_options("ct2")))
    a, b = results
    assert a.identity == b.identity and a.cache == b.cache
    assert a.view != b.view
    # The results are byte-identical too, manifest included.
    for name in sorted(os.listdir(a.view)):
        assert (a.view / name).read_bytes() == (b.view / name).read_bytes(), name


def test_concurrent_conversions_of_one_identity_run_once(caches: Caches, make_tree,
                                                         fake_converter):
    origin = make_tree("m", model_files())
    Conversions(caches).resolve_input(str(origin))  # pull once, so both threads race on converting
    fake_converter.delay = 1.0
    results, errors, waited = [], [], []

    def worker() -> None:
        try:
            own = Caches(caches.settings)
            results.append(Conversions(own).convert(str(origin), make_options("fake"),
                                                    on_wait=waited.append))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert fake_converter.runs == 1
    assert len({r.view for r in results}) == 1
    assert sorted(r.cached for r in results) == [False, True, True]
    # The waiters were told which job they waited for.
    assert len(waited) == 2 and all(j is not None and j.kind == "convert" for j in waited)


def test_a_failed_conversion_leaves_a_failed_job_with_its_log_and_no_result(
        caches: Caches, make_tree, fake_converter):
    origin = make_tree("m", model_files())
    fake_converter.fail_after_partial = True
    with pytest.raises(ConversionError, match="broke half-way"):
        Conversions(caches).convert(str(origin), make_options("fake"))
    jobs = Jobs(caches.store)
    [job] = jobs.list()
    assert job.status == FAILED and "broke half-way" in job.error
    assert job.step == "half-way"
    log = "\n".join(line.message for line in jobs.logs(job.id))
    assert "about to fail" in log and "Traceback" in log and "RuntimeError" in log
    assert caches.list(BUCKET) == []
    assert not (caches.store.views.root / BUCKET).exists()
    assert not any((caches.store.blobs.tmp_dir / "convert").iterdir())

    # The next attempt converts (nothing half-written was taken for a result).
    fake_converter.fail_after_partial = False
    result = Conversions(caches).convert(str(origin), make_options("fake"))
    assert not result.cached and fake_converter.runs == 2


def test_a_broken_result_is_converted_again(caches: Caches, make_tree, fake_converter):
    origin = make_tree("m", model_files())
    first = Conversions(caches).convert(str(origin), make_options("fake"))
    manifest = first.view / "cachemesh-convert.json"
    os.chmod(manifest, 0o644)
    manifest.unlink()
    again = Conversions(caches).convert(str(origin), make_options("fake"))
    assert not again.cached and fake_converter.runs == 2
    assert read_manifest(again.view)["identity"] == first.identity


@pytest.mark.parametrize("args, message", [
    (["--to", "tflite"], "unknown conversion target 'tflite'"),
    (["--to", "ct2", "--quantization", "int3"], "unknown --quantization 'int3'"),
    (["--to", "ct2", "--tp", "2"], "--tp applies to --to safetensors"),
    (["--to", "safetensors", "--tp", "0"], "--tp must be a positive integer"),
    (["--to", "safetensors", "--tp", "3"], "--tp 3 does not divide the attention heads"),
    (["--to", "safetensors"], "needs --tp N"),
    (["--to", "onnx"], "decoder language models convert with --to ct2"),
    ([], "--to is required"),
])
def test_bad_options_exit_2_with_a_clear_message_and_leave_nothing(llama, clean_env, args,
                                                                   message):
    origin, _, _ = llama
    proc = cli("convert", str(origin), *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert proc.stdout == ""
    assert not (clean_env / "buckets" / BUCKET).exists()
    jobs = json.loads(cli("jobs", "ls", "--json").stdout)
    assert jobs == []


def test_an_unsupported_architecture_is_refused(make_tree, clean_env):
    files = {**model_files(), "config.json": b'{"model_type": "mystery-net"}',
             "model.safetensors": b"\0" * 16, "tokenizer.json": b"{}"}
    origin = make_tree("odd", files)
    for target, message in (("ct2", "CTranslate2 cannot convert model_type 'mystery-net'"),
                            ("onnx", "not model_type 'mystery-net'")):
        proc = cli("convert", str(origin), "--to", target)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    proc = cli("convert", str(origin), "--tp", "2")
    assert proc.returncode == 2 and "no tensor-parallel layout" in proc.stderr
    no_config = make_tree("plain", {"weights.bin": b"x"})
    proc = cli("convert", str(no_config), "--to", "ct2")
    assert proc.returncode == 2 and "has no config.json" in proc.stderr
    assert json.loads(cli("jobs", "ls", "--json").stdout) == []
    assert not (clean_env / "buckets" / BUCKET).exists()


def test_invalid_input_is_refused_by_the_api_too(caches: Caches, make_tree):
    with pytest.raises(InvalidInputError):
        make_options("ct2", tp=-1)
    with pytest.raises(InvalidInputError, match="unknown conversion target"):
        Conversions(caches).convert(str(make_tree("m", model_files())), make_options("nope"))


def test_cli_prints_the_view_last_and_a_second_run_is_a_hit(llama, clean_env):
    origin, _, _ = llama
    first = cli("convert", str(origin), "--to", "ct2", "--quantization", "int8")
    assert first.returncode == 0, first.stderr
    view = Path(first.stdout.strip().splitlines()[-1])
    assert view.parent == clean_env / "buckets" / BUCKET and (view / "model.bin").is_file()
    assert "converted by job" in first.stderr
    second = cm("convert", str(origin), "--to", "ct2", "--quantization", "int8")
    assert second.stdout.strip().splitlines()[-1] == str(view)
    assert "already converted" in second.stderr
    [job] = json.loads(cm("jobs", "ls", "--json").stdout)
    assert job["status"] == "Succeeded" and job["result"]["view"] == str(view)
    as_json = json.loads(cm("convert", str(origin), "--to", "ct2", "--quantization", "int8",
                            "--json").stdout)
    assert as_json["cached"] is True and as_json["view"] == str(view)
    listed = {c["name"]: c for c in json.loads(cm("cache", "ls", "--json").stdout)}
    assert listed[view.name]["bucket"] == BUCKET
    assert json.loads(cm("cache", "verify", "--json").stdout)["ok"] is True


def test_cli_a_converter_failure_exits_1_and_leaves_a_failed_job(make_tree, clean_env):
    config = json.dumps({"model_type": "bert", "architectures": ["BertModel"],
                         "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "intermediate_size": 16}).encode()
    origin = make_tree("broken-bert", {"config.json": config,
                                       "model.safetensors": b"not a safetensors file"})
    proc = cli("convert", str(origin), "--to", "onnx")
    assert proc.returncode == 1, proc.stderr
    assert "error:" in proc.stderr and proc.stdout == ""
    [job] = json.loads(cli("jobs", "ls", "--json").stdout)
    assert job["status"] == "Failed" and job["error"]
    logs = cm("jobs", "logs", job["id"])
    assert "Traceback" in logs.stdout
    assert not (clean_env / "buckets" / BUCKET).exists()
    assert not any((clean_env / "tmp" / "convert").iterdir())


def test_a_conversion_in_a_store_every_user_reaches_is_stored(fake_converter):
    """The staged result under tmp/convert (0700) is the store's own output, not a
    private local file: it becomes a view of the open bucket `converted` also where
    every local user reaches the store (issue 22, item 1 refuses the latter only)."""
    import shutil
    import tempfile

    public = Path(tempfile.mkdtemp(prefix="cachemesh-convert-"))
    try:
        public.chmod(0o755)
        origin = public / "origin"
        for rel, data in model_files().items():
            (origin / rel).parent.mkdir(parents=True, exist_ok=True)
            (origin / rel).write_bytes(data)
        os.system(f"chmod -R a+rX {origin}")
        caches = Caches(Settings.from_env({"CACHEMESH_HOME": str(public / "home")}))
        assert caches.store.views.readable_by_all(BUCKET)
        done = Conversions(caches).convert(str(origin), make_options("fake"))
        assert (done.view / "done.txt").read_text() == "none"
        assert caches.verify() == []
    finally:
        shutil.rmtree(public, ignore_errors=True)
