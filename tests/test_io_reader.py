"""The reader's API: lazy refs, zero-copy views, float32 widening, ordering, release, digests."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import psutil
import pytest
import safetensors.numpy

from mmerge.errors import InvalidInput
from mmerge.io import Checkpoint, StreamingWriter, TensorRef, TensorSpec, open_checkpoint


def write(path, arrays: dict[str, tuple[str, np.ndarray]], **kw):
    specs = [TensorSpec(n, c, a.shape) for n, (c, a) in arrays.items()]
    with StreamingWriter(path, specs, **kw) as w:
        for n, (_, a) in arrays.items():
            w.write(n, a)
            w.finish_tensor(n)
    return path


@pytest.fixture
def ckpt(tmp_path):
    x = np.arange(24, dtype=np.float32).reshape(4, 6) / 7
    arrays = {
        "f32": ("F32", x),
        "bf16": ("BF16", x),
        "f16": ("F16", x),
        "e4m3": ("F8_E4M3", x),
        "i32": ("I32", np.arange(5, dtype=np.int32)),
        "mask": ("BOOL", np.array([True, False, True])),
        "scalar": ("F64", np.array(2.5)),
    }
    with open_checkpoint(write(tmp_path / "m.safetensors", arrays)) as c:
        yield c


def test_mapping_and_attributes(ckpt, tmp_path):
    assert isinstance(ckpt, Checkpoint)
    assert list(ckpt) == ["f32", "bf16", "f16", "e4m3", "i32", "mask", "scalar"]
    assert ckpt.path == tmp_path / "m.safetensors" and ckpt.files == [ckpt.path]
    assert not ckpt.is_folder
    assert ckpt.metadata == {"format": "pt"}
    ref = ckpt["bf16"]
    assert isinstance(ref, TensorRef)
    assert (ref.name, ref.dtype, ref.shape, ref.numel, ref.nbytes) == (
        "bf16",
        "BF16",
        (4, 6),
        24,
        48,
    )
    assert ref.file == ckpt.path and ref.end - ref.start == 48
    assert ckpt.nbytes == sum(r.nbytes for r in ckpt.values()) == 96 + 48 + 48 + 24 + 20 + 3 + 8
    with pytest.raises(KeyError):
        ckpt["nope"]


def test_raw_and_to_numpy_are_zero_copy_read_only_views(ckpt):
    x = np.arange(24, dtype=np.float32).reshape(4, 6) / 7
    for name in ("f32", "i32", "mask", "scalar", "f16"):
        arr = ckpt[name].to_numpy()
        assert not arr.flags.writeable and not arr.flags.owndata
    np.testing.assert_array_equal(ckpt["f32"].to_numpy(), x)
    assert ckpt["scalar"].to_numpy().shape == () and ckpt["scalar"].to_numpy() == 2.5
    assert ckpt["bf16"].raw().dtype == np.uint16 and ckpt["e4m3"].raw().dtype == np.uint8
    assert ckpt["mask"].raw().dtype == np.bool_
    np.testing.assert_array_equal(ckpt["f32"].raw(5, 9), x.reshape(-1)[5:9])
    with pytest.raises(ValueError):
        ckpt["f32"].raw()[0] = 1


def test_values_view_in_the_number_type(ckpt):
    x = (np.arange(24, dtype=np.float32) / 7).astype(ml_dtypes.bfloat16)
    vals = ckpt["bf16"].values()
    assert vals.dtype == ml_dtypes.bfloat16 and vals.shape == (24,)
    assert not vals.flags.writeable and not vals.flags.owndata
    np.testing.assert_array_equal(vals, x)
    assert ckpt["e4m3"].values().dtype == ml_dtypes.float8_e4m3fn
    assert ckpt["f16"].values().dtype == np.float16


def test_widening_dtypes_give_new_float32(ckpt):
    x = np.arange(24, dtype=np.float32).reshape(4, 6) / 7
    got = ckpt["bf16"].to_numpy()
    assert got.dtype == np.float32 and got.flags.writeable
    np.testing.assert_array_equal(got, x.astype(ml_dtypes.bfloat16).astype(np.float32))
    e4 = ckpt["e4m3"].to_numpy()
    np.testing.assert_array_equal(e4, x.astype(ml_dtypes.float8_e4m3fn).astype(np.float32))


def test_read_float32_ranges_and_out(ckpt):
    x = (np.arange(24, dtype=np.float32) / 7).astype(ml_dtypes.bfloat16).astype(np.float32)
    ref = ckpt["bf16"]
    out = np.full(10, -1, np.float32)
    res = ref.read_float32(3, 13, out=out)
    assert res is out
    np.testing.assert_array_equal(out, x[3:13])
    np.testing.assert_array_equal(ref.read_float32(20), x[20:])
    assert ckpt["f32"].read_float32().base is not None  # F32 without out: a view, no copy
    np.testing.assert_array_equal(ckpt["i32"].read_float32(), np.arange(5, dtype=np.float32))
    np.testing.assert_array_equal(ckpt["mask"].read_float32(), [1, 0, 1])
    assert ref.read_float32(7, 7).size == 0
    with pytest.raises(InvalidInput, match="range"):
        ref.read_float32(5, 30)
    with pytest.raises(InvalidInput, match="range"):
        ref.raw(-1)
    with pytest.raises(InvalidInput, match="out must be"):
        ref.read_float32(0, 4, out=np.empty(5, np.float32))
    with pytest.raises(InvalidInput, match="out must be"):
        ref.read_float32(0, 4, out=np.empty(4, np.float64))


def test_bf16_widening_is_exact_for_every_bit_pattern(tmp_path):
    bits = np.arange(2**16, dtype=np.uint16)
    with open_checkpoint(write(tmp_path / "b.safetensors", {"b": ("BF16", bits)})) as c:
        got = c["b"].read_float32()
    assert np.array_equal(got.view(np.uint32), bits.astype(np.uint32) << 16)


def test_f8_widening_matches_ml_dtypes_for_every_bit_pattern(tmp_path):
    bits = np.arange(256, dtype=np.uint8)
    arrays = {"a": ("F8_E4M3", bits), "b": ("F8_E5M2", bits)}
    with open_checkpoint(write(tmp_path / "f8.safetensors", arrays)) as c:
        for name, t in (("a", ml_dtypes.float8_e4m3fn), ("b", ml_dtypes.float8_e5m2)):
            want = bits.view(t).astype(np.float32)
            np.testing.assert_array_equal(c[name].read_float32(), want)


def test_storage_dtype_arrays_are_written_as_raw_bits(tmp_path):
    """raw() of one checkpoint written into another copies BF16/F8 bits unchanged."""
    bits = np.random.default_rng(1).integers(0, 2**16, 100, dtype=np.uint16)
    src = write(tmp_path / "a.safetensors", {"w": ("BF16", bits)})
    with open_checkpoint(src) as c:
        dst = write(tmp_path / "b.safetensors", {"w": ("BF16", c["w"].raw())})
    assert dst.read_bytes() == src.read_bytes()


def test_folder_without_index_reads_files_in_name_order(tmp_path):
    safetensors.numpy.save_file({"z": np.zeros(2, np.float32)}, tmp_path / "b.safetensors")
    safetensors.numpy.save_file({"a": np.ones(3, np.int8)}, tmp_path / "a.safetensors")
    (tmp_path / "notes.txt").write_text("ignored")
    with open_checkpoint(tmp_path) as c:
        assert list(c) == ["a", "z"] and c.is_folder
        assert [f.name for f in c.files] == ["a.safetensors", "b.safetensors"]


def test_header_order_is_kept(tmp_path):
    arrays = {n: ("F32", np.full(2, i, np.float32)) for i, n in enumerate(["zeta", "alpha", "mu"])}
    with open_checkpoint(write(tmp_path / "o.safetensors", arrays)) as c:
        assert list(c) == ["zeta", "alpha", "mu"]


def test_metadata_is_merged_over_shards(tmp_path):
    arrays = {f"t{i}": ("F32", np.zeros(100, np.float32)) for i in range(3)}
    out = write(tmp_path / "out", arrays, shard_size=400, metadata={"mmerge.method": "linear"})
    with open_checkpoint(out) as c:
        assert len(c.files) == 3
        assert c.metadata == {"format": "pt", "mmerge.method": "linear"}


def test_header_digest_tracks_headers_not_folder_names(tmp_path):
    arrays = {"w": ("F32", np.zeros(4, np.float32))}
    a = write(tmp_path / "a" / "m.safetensors", arrays)
    b = write(tmp_path / "b" / "m.safetensors", {"w": ("F32", np.ones(4, np.float32))})
    c = write(tmp_path / "c" / "m.safetensors", {"w": ("F16", np.ones(4, np.float32))})
    d = [open_checkpoint(p).header_digest() for p in (a, b, c)]
    assert d[0] == d[1] != d[2] and len(d[0]) == 64


def test_release_drops_resident_pages(tmp_path):
    n = 16 << 20  # 64 MiB of F32
    path = write(tmp_path / "big.safetensors", {"w": ("F32", np.ones(n, np.float32))})
    proc = psutil.Process()
    with open_checkpoint(path) as c:
        before = proc.memory_info().rss
        assert float(c["w"].raw().sum()) == n  # touch every page
        touched = proc.memory_info().rss
        c["w"].release()
        released = proc.memory_info().rss
    assert touched - before > 48 << 20
    assert touched - released > 48 << 20


def test_release_of_an_element_range(tmp_path):
    n = 16 << 20
    path = write(tmp_path / "big.safetensors", {"w": ("F32", np.ones(n, np.float32))})
    proc = psutil.Process()
    with open_checkpoint(path) as c:
        ref = c["w"]
        assert float(ref.raw().sum()) == n
        touched = proc.memory_info().rss
        ref.release(0, n // 2)  # the first half only
        half = proc.memory_info().rss
        ref.release(n // 2)
        released = proc.memory_info().rss
        with pytest.raises(InvalidInput, match="range"):
            ref.release(0, n + 1)
    assert 24 << 20 < touched - half < 40 << 20
    assert touched - released > 56 << 20


def test_close_and_context_manager(tmp_path):
    path = write(tmp_path / "c.safetensors", {"w": ("F32", np.ones(3, np.float32))})
    c = open_checkpoint(path)
    kept = c["w"].to_numpy()  # an array still viewing the map keeps it valid
    c.close()
    assert kept.sum() == 3
    with pytest.raises(InvalidInput, match="closed"):
        c["w"].raw()


def test_index_weight_map_order_is_kept(tmp_path):
    arrays = {"a": ("F32", np.zeros(2, np.float32)), "b": ("F32", np.ones(2, np.float32))}
    out = write(tmp_path / "m", arrays, shard_size=8)
    index = out / "model.safetensors.index.json"
    obj = json.loads(index.read_text())
    obj["weight_map"] = {"b": obj["weight_map"]["b"], "a": obj["weight_map"]["a"]}
    index.write_text(json.dumps(obj))
    with open_checkpoint(out) as c:
        assert list(c) == ["b", "a"]
        assert [f.name for f in c.files] == [
            "model-00002-of-00002.safetensors",
            "model-00001-of-00002.safetensors",
        ]
