"""A generated corpus of malformed and hostile checkpoints: each gets a clear FormatError naming
the file (and tensor), quickly, without a large allocation."""

from __future__ import annotations

import json
import os
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from mmerge.errors import FormatError
from mmerge.io import open_checkpoint


def raw_file(path: Path, header: object, data: bytes = b"", n: int | None = None) -> Path:
    """A file of `u64 n`, the header (JSON-encoded unless bytes) and `data`."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if n is None else n) + text + data)
    return path


def f32(offsets, shape=(2,), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


GOOD = {"a": f32([0, 8]), "b": f32([8, 16])}
DEEP = b"[" * 200_000 + b"]" * 200_000

# name -> (header, data, length prefix override, expected message fragment)
FILE_CASES = {
    "empty file": (None, b"", None, "too short"),
    "length 2**63": (b"{}", b"", 2**63, "cap"),
    "length 2**64-1": (b"{}", b"", 2**64 - 1, "cap"),
    "length past end": (b"{}", b"", 1000, "past the end of the file"),
    "length cuts the JSON": (GOOD, bytes(16), 10, "not valid JSON"),
    "bad JSON": (b"{not json", b"", None, "not valid JSON"),
    "bad UTF-8": (b'{"\xff\xfe": 1}', b"", None, "not valid JSON"),
    "deeply nested JSON": (DEEP, b"", None, "not valid JSON"),
    "JSON array": ([], b"", None, "not a JSON object"),
    "duplicate key": (b'{"a":1,"a":2}', b"", None, "duplicate key"),
    "metadata not an object": ({"__metadata__": [1]}, b"", None, "not a JSON object"),
    "metadata int value": ({"__metadata__": {"k": 1}}, b"", None, "not a string"),
    "metadata null value": ({"__metadata__": {"k": None}}, b"", None, "not a string"),
    "entry not an object": ({"a": 3}, b"", None, "'a': entry is not"),
    "unknown dtype": ({"a": f32([0, 8], dtype="F128")}, bytes(8), None, "'a': unknown dtype"),
    "dtype not a string": ({"a": f32([0, 8], dtype=["F32"])}, bytes(8), None, "unknown dtype"),
    "missing dtype": ({"a": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8), None, "dtype"),
    "negative shape": ({"a": f32([0, 8], shape=(-2,))}, bytes(8), None, "'a': shape"),
    "float shape": ({"a": f32([0, 8], shape=(2.0,))}, bytes(8), None, "shape"),
    "bool shape": ({"a": f32([0, 8], shape=(True, 2))}, bytes(8), None, "shape"),
    "string shape": ({"a": f32([0, 8], shape=("2",))}, bytes(8), None, "shape"),
    "shape not a list": ({"a": {**f32([0, 8]), "shape": 2}}, bytes(8), None, "shape"),
    "shape [2**40]": ({"a": f32([0, 4], shape=(2**40,))}, bytes(4), None, "does not fit"),
    "shape of huge dims": (
        {"a": f32([0, 4], shape=(2**62,) * 20000)},
        bytes(4),
        None,
        "20000 dimensions",
    ),
    "size disagrees": ({"a": f32([0, 8], shape=(3,))}, bytes(8), None, "does not fit"),
    "offsets reversed": ({"a": f32([8, 0])}, bytes(8), None, "data_offsets"),
    "offsets negative": ({"a": f32([-8, 0])}, bytes(8), None, "data_offsets"),
    "offsets one number": ({"a": f32([8])}, bytes(8), None, "data_offsets"),
    "offsets strings": ({"a": f32(["0", "8"])}, bytes(8), None, "data_offsets"),
    "offsets huge": ({"a": f32([2**70, 2**70 + 8])}, bytes(8), None, "hole"),
    "overlap": ({"a": f32([0, 8]), "b": f32([4, 12])}, bytes(12), None, "'b' overlaps"),
    "same range twice": ({"a": f32([0, 8]), "b": f32([0, 8])}, bytes(8), None, "overlaps"),
    "hole": ({"a": f32([0, 8]), "b": f32([12, 20])}, bytes(20), None, "'b' leaves a hole"),
    "hole at start": ({"a": f32([4, 12])}, bytes(12), None, "'a' leaves a hole"),
    "past the end": (GOOD, bytes(12), None, "runs past the end"),
    "trailing bytes": (GOOD, bytes(20), None, "4 bytes short of the file end"),
    "no tensors, data": ({}, bytes(8), None, "no tensors"),
}


def _build(path: Path, case) -> Path:
    header, data, n, _ = case
    if header is None:
        path.write_bytes(data)
        return path
    return raw_file(path, header, data, n)


def assert_rejected(path: Path, fragment: str, names: tuple[str, ...] = ()) -> FormatError:
    """open_checkpoint raises FormatError containing `fragment`, in under a second, with a small
    peak of Python allocations."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(FormatError) as info:
            open_checkpoint(path)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 1.0
    assert peak < 20 << 20, f"peak allocation {peak} bytes"
    msg = str(info.value)
    assert fragment in msg, msg
    for name in names:
        assert name in msg, msg
    assert "\n" not in msg
    return info.value


@pytest.mark.parametrize("case", list(FILE_CASES), ids=list(FILE_CASES))
def test_malformed_file_is_rejected(tmp_path, case):
    path = _build(tmp_path / "bad.safetensors", FILE_CASES[case])
    assert_rejected(path, FILE_CASES[case][3], names=(str(path),))


@pytest.mark.parametrize("short", [7, 1, 0])
def test_header_length_between_size_minus_8_and_size_runs_past_the_end(tmp_path, short):
    path = tmp_path / "bad.safetensors"
    body = b'{"__metadata__":{}}' + bytes(13)
    size = 8 + len(body)
    path.write_bytes(struct.pack("<Q", size - short) + body)
    error = assert_rejected(path, "runs past the end of the file", names=(str(path),))
    assert f"header length {size - short} " in str(error)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (json.dumps({"architectures": ["LlamaForCausalLM"]}).encode(), "it is text, beginning"),
        (b"PK\x03\x04" + bytes(60), "zip archive"),
        (b"GGUF\x03\x00\x00\x00" + bytes(60), "GGUF"),
        (b"\x80\x02}q\x00(X\x05" + bytes(60), "pickle"),
    ],
)
def test_other_formats_are_named_not_a_safetensors_file(tmp_path, content, fragment):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    error = assert_rejected(path, "not a safetensors file", names=(str(path),))
    assert fragment in str(error)


def test_truncated_real_file(tmp_path):
    path = tmp_path / "t.safetensors"
    safetensors.numpy.save_file({"w": np.zeros((64, 64), np.float32)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    assert_rejected(path, "runs past the end", names=("'w'",))


def test_the_good_case_opens(tmp_path):
    """The corpus's well-formed baseline is accepted, so the cases test what they say."""
    with open_checkpoint(raw_file(tmp_path / "g.safetensors", GOOD, bytes(16))) as c:
        assert list(c) == ["a", "b"]


# -- folders and indexes -----------------------------------------------------------------------


def shard(folder: Path, name: str, tensors: dict[str, float]) -> str:
    safetensors.numpy.save_file(
        {t: np.full(2, v, np.float32) for t, v in tensors.items()}, folder / name
    )
    return name


def index(folder: Path, weight_map: object, raw: bytes | None = None) -> Path:
    path = folder / "model.safetensors.index.json"
    path.write_bytes(raw if raw is not None else json.dumps({"weight_map": weight_map}).encode())
    return path


def test_index_bad_json(tmp_path):
    idx = index(tmp_path, None, raw=b"{oops")
    assert_rejected(tmp_path, "not valid JSON", names=(str(idx),))


@pytest.mark.parametrize("weight_map", [None, [], "x"])
def test_index_without_weight_map(tmp_path, weight_map):
    index(tmp_path, weight_map)
    assert_rejected(tmp_path, "no 'weight_map' object")


@pytest.mark.parametrize("where", ["../outside.safetensors", "sub/../../outside.safetensors"])
def test_shard_outside_the_folder(tmp_path, where):
    folder = tmp_path / "m"
    (folder / "sub").mkdir(parents=True)
    shard(tmp_path, "outside.safetensors", {"w": 1})
    index(folder, {"w": where})
    assert_rejected(folder, "outside the checkpoint folder", names=("'w'",))


def test_absolute_shard_path(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    shard(tmp_path, "outside.safetensors", {"w": 1})
    index(folder, {"w": str(tmp_path / "outside.safetensors")})
    assert_rejected(folder, "outside the checkpoint folder", names=("'w'",))


@pytest.mark.parametrize("value", [3, None, ""])
def test_shard_not_a_name(tmp_path, value):
    index(tmp_path, {"w": value})
    assert_rejected(tmp_path, "is not a file name", names=("'w'",))


def test_missing_shard(tmp_path):
    index(tmp_path, {"w": "model-00001-of-00001.safetensors"})
    assert_rejected(tmp_path, "does not exist", names=("'w'",))


def test_symlinked_shards_are_accepted(tmp_path):
    """The Hub cache keeps shards as symlinks to blobs elsewhere: the name decides, not the
    link target."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snap"
    blobs.mkdir()
    snap.mkdir()
    shard(blobs, "abc123", {"w": 1})
    (snap / "model.safetensors").symlink_to(blobs / "abc123")
    index(snap, {"w": "model.safetensors"})
    with open_checkpoint(snap) as c:
        assert c["w"].to_numpy().tolist() == [1, 1]


def test_duplicate_across_shards_in_a_plain_folder(tmp_path):
    shard(tmp_path, "a.safetensors", {"w": 1, "x": 2})
    shard(tmp_path, "b.safetensors", {"w": 3})
    err = assert_rejected(tmp_path, "is also in", names=("'w'", "a.safetensors"))
    assert "b.safetensors" in str(err)


def test_duplicate_across_shards_in_an_indexed_folder(tmp_path):
    shard(tmp_path, "s1.safetensors", {"w": 1})
    shard(tmp_path, "s2.safetensors", {"w": 2, "x": 3})
    index(tmp_path, {"w": "s1.safetensors", "x": "s2.safetensors"})
    assert_rejected(tmp_path, "is also in", names=("'w'",))


def test_index_names_a_tensor_its_shard_lacks(tmp_path):
    shard(tmp_path, "s1.safetensors", {"w": 1})
    index(tmp_path, {"w": "s1.safetensors", "ghost": "s1.safetensors"})
    assert_rejected(tmp_path, "'ghost' is not in its shard")


def test_shard_holds_a_tensor_the_index_does_not_map_there(tmp_path):
    shard(tmp_path, "s1.safetensors", {"w": 1, "stray": 2})
    index(tmp_path, {"w": "s1.safetensors"})
    assert_rejected(tmp_path, "'stray' is not mapped to this shard")


def test_bad_shard_names_the_shard(tmp_path):
    shard(tmp_path, "s1.safetensors", {"w": 1})
    bad = raw_file(tmp_path / "s2.safetensors", {"x": f32([0, 8])}, bytes(4))
    index(tmp_path, {"w": "s1.safetensors", "x": "s2.safetensors"})
    assert_rejected(tmp_path, "runs past the end", names=(str(bad), "'x'"))


def test_empty_folder_missing_path_and_special_files(tmp_path):
    assert_rejected(tmp_path, "no model.safetensors.index.json and no *.safetensors")
    assert_rejected(tmp_path / "nope", "no such file or folder")
    os.mkfifo(tmp_path / "fifo")
    assert_rejected(tmp_path / "fifo", "not a regular file or folder")


def test_unreadable_index(tmp_path):
    (tmp_path / "model.safetensors.index.json").mkdir()
    assert_rejected(tmp_path, "cannot read")
