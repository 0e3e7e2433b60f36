"""Finding a checkpoint's files: one file, a shard index, a plain directory, what goes wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cachemesh.errors import LoadError
from cachemesh.load import load_state_dict, read_checkpoint


def shard(directory: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / name)


def index(
    directory: Path, weight_map: dict[str, str], name: str = "model.safetensors.index.json"
) -> None:
    (directory / name).write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )


def sharded(tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    shard(d, "model-00002-of-00002.safetensors", {"b": torch.ones(3), "c": torch.full((2,), 7.0)})
    shard(d, "model-00001-of-00002.safetensors", {"a": torch.zeros(2, 2)})
    index(
        d,
        {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
            "c": "model-00002-of-00002.safetensors",
        },
    )
    return d


def test_sharded_directory_follows_the_index(tmp_path: Path) -> None:
    d = sharded(tmp_path)
    ckpt = read_checkpoint(d)
    assert [h.path.name for h in ckpt.headers] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert ckpt.nbytes == 16 + 12 + 8
    sd = load_state_dict(d)
    assert list(sd) == ["a", "b", "c"]
    assert sd["c"].tolist() == [7.0, 7.0]
    assert sd.stats.files == 2


def test_directory_without_index_loads_every_file(tmp_path: Path) -> None:
    shard(tmp_path, "z.safetensors", {"z": torch.ones(1)})
    shard(tmp_path, "a.safetensors", {"a": torch.zeros(1)})
    (tmp_path / "notes.txt").write_text("not weights")
    assert list(load_state_dict(tmp_path)) == ["a", "z"]


def test_single_file_and_str_path(tmp_path: Path) -> None:
    shard(tmp_path, "one.safetensors", {"x": torch.arange(4)})
    assert load_state_dict(str(tmp_path / "one.safetensors"))["x"].tolist() == [0, 1, 2, 3]


def test_missing_shard_names_the_file(tmp_path: Path) -> None:
    d = sharded(tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(LoadError, match="model-00002-of-00002.safetensors: shard listed in"):
        load_state_dict(d)


def test_index_promising_a_tensor_the_shard_lacks(tmp_path: Path) -> None:
    d = sharded(tmp_path)
    index(d, {"a": "model-00001-of-00002.safetensors", "ghost": "model-00002-of-00002.safetensors"})
    with pytest.raises(LoadError, match="has no tensor 'ghost'"):
        read_checkpoint(d)


def test_same_tensor_in_two_files(tmp_path: Path) -> None:
    shard(tmp_path, "a.safetensors", {"w": torch.ones(1)})
    shard(tmp_path, "b.safetensors", {"w": torch.zeros(1)})
    with pytest.raises(LoadError, match="'w' is also defined in"):
        read_checkpoint(tmp_path)


@pytest.mark.parametrize("bad", ["../escape.safetensors", "/etc/passwd", "sub/x.safetensors", ".."])
def test_index_cannot_point_outside_its_directory(tmp_path: Path, bad: str) -> None:
    shard(tmp_path, "a.safetensors", {"w": torch.ones(1)})
    index(tmp_path, {"w": bad})
    with pytest.raises(LoadError, match="is not a file name"):
        read_checkpoint(tmp_path)


def test_unreadable_index(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(LoadError, match="unreadable shard index"):
        read_checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": [1]}')
    with pytest.raises(LoadError, match="weight_map must map"):
        read_checkpoint(tmp_path)


def test_other_index_name_used_when_alone_and_ambiguity_refused(tmp_path: Path) -> None:
    shard(tmp_path, "m.fp16.safetensors", {"w": torch.ones(1)})
    index(tmp_path, {"w": "m.fp16.safetensors"}, name="m.fp16.safetensors.index.json")
    assert list(load_state_dict(tmp_path)) == ["w"]
    index(tmp_path, {"w": "m.fp16.safetensors"}, name="m.other.safetensors.index.json")
    with pytest.raises(LoadError, match="several shard indexes"):
        read_checkpoint(tmp_path)


def test_empty_directory_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="no \\*.safetensors files"):
        read_checkpoint(tmp_path)
    with pytest.raises(LoadError, match="no such file or directory"):
        read_checkpoint(tmp_path / "absent")


def test_sizing_a_checkpoint_does_not_import_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    shard(tmp_path, "a.safetensors", {"w": torch.ones(10)})
    code = (
        "import sys; from cachemesh.load import read_checkpoint; "
        f"print(read_checkpoint({str(tmp_path)!r}).nbytes, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["40", "False"]
