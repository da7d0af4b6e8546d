"""Round trips with the official safetensors package, both ways, for every dtype and layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmerge.io import DTYPES, StreamingWriter, TensorSpec, open_checkpoint

TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
SHAPES = [(), (0,), (3, 0, 2), (1,), (7,), (2, 3, 5)]


def random_bits(code: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random storage elements of `code`: any bit pattern (NaNs included) except for BOOL."""
    storage = DTYPES[code].storage
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if code == "BOOL":
        return rng.integers(0, 2, n).astype(bool)
    return rng.integers(0, 256, n * storage.itemsize, dtype=np.uint8).view(storage)


def torch_bytes(t: torch.Tensor) -> bytes:
    return t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def from_bits(code: str, bits: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    if bits.size == 0:
        return torch.empty(shape, dtype=TORCH_DTYPES[code])
    raw = torch.from_numpy(bits.view(np.uint8).copy())
    return raw.view(TORCH_DTYPES[code]).reshape(shape)


def write_ours(path, tensors: dict[str, tuple[str, np.ndarray, tuple]], **kw) -> None:
    specs = [TensorSpec(name, code, shape) for name, (code, _, shape) in tensors.items()]
    with StreamingWriter(path, specs, **kw) as w:
        for name, (_, bits, _) in tensors.items():
            w.write(name, bits)
            w.finish_tensor(name)


def sample(seed: int = 0) -> dict[str, tuple[str, np.ndarray, tuple]]:
    """One tensor per (dtype, shape), with a unicode name among them."""
    out = {}
    for i, code in enumerate(DTYPES):
        for j, shape in enumerate(SHAPES):
            out[f"t.{code}.{j}"] = (code, random_bits(code, shape, seed + 10 * i + j), shape)
    out["ünïcödé/名前 ✓"] = ("F32", random_bits("F32", (2, 2), seed + 999), (2, 2))
    return out


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_official_reads_what_we_write(tmp_path, layout):
    tensors = sample()
    out = tmp_path / ("out.safetensors" if layout == "file" else "out")
    write_ours(out, tensors, shard_size=None if layout == "file" else 500, metadata={"k": "v"})
    files = [out] if layout == "file" else sorted(out.glob("model-*.safetensors"))  # several shards
    assert len(files) == 1 if layout == "file" else len(files) > 2
    loaded, meta = {}, {}
    for f in files:
        with safetensors.safe_open(f, framework="pt") as sf:
            meta.update(sf.metadata())
            for name in sf.keys():  # noqa: SIM118 - safe_open has no __iter__
                loaded[name] = sf.get_tensor(name)
        assert set(safetensors.torch.load_file(f)) <= set(tensors)
    assert meta == {"format": "pt", "k": "v"}
    assert set(loaded) == set(tensors)
    for name, (code, bits, shape) in tensors.items():
        t = loaded[name]
        assert t.dtype == TORCH_DTYPES[code] and tuple(t.shape) == shape, name
        assert torch_bytes(t) == bits.tobytes(), name


def test_official_numpy_loader_reads_what_we_write(tmp_path):
    tensors = {k: v for k, v in sample().items() if v[0] in safetensors.numpy._TYPES}
    write_ours(tmp_path / "n.safetensors", tensors)
    loaded = safetensors.numpy.load_file(tmp_path / "n.safetensors")
    for name, (_, bits, shape) in tensors.items():
        assert loaded[name].shape == shape
        assert loaded[name].tobytes() == bits.tobytes()


def test_we_read_what_official_torch_writes(tmp_path):
    tensors = sample(seed=5)
    torch_tensors = {n: from_bits(c, b, s) for n, (c, b, s) in tensors.items()}
    safetensors.torch.save_file(torch_tensors, tmp_path / "o.safetensors", metadata={"a": "b"})
    with open_checkpoint(tmp_path / "o.safetensors") as ckpt:
        assert ckpt.metadata == {"a": "b"}
        assert set(ckpt) == set(tensors)
        for name, (code, bits, shape) in tensors.items():
            ref = ckpt[name]
            assert (ref.dtype, ref.shape) == (code, shape)
            assert ref.raw().tobytes() == bits.tobytes()


def test_we_read_official_sharded_folder(tmp_path):
    """A folder as transformers writes it: shards plus an index with a sorted weight_map."""
    names = [f"model.layers.{i}.w" for i in range(12)]
    arrays = {n: np.full((4, 3), i, np.float32) for i, n in enumerate(names)}
    weight_map = {}
    for k in range(3):
        shard = f"model-{k + 1:05d}-of-00003.safetensors"
        part = {n: arrays[n] for n in names[4 * k : 4 * k + 4]}
        safetensors.numpy.save_file(part, tmp_path / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": 12 * 48}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with open_checkpoint(tmp_path) as ckpt:
        assert list(ckpt) == sorted(names)  # index order
        assert len(ckpt.files) == 3 and ckpt.is_folder
        for n in names:
            np.testing.assert_array_equal(ckpt[n].to_numpy(), arrays[n])


def test_values_are_cast_like_torch(tmp_path):
    """Float32 values written to BF16/F16/F8 round (and saturate) exactly as torch does."""
    x = np.random.default_rng(0).standard_normal(4096).astype(np.float32) * 3
    x[:6] = [np.inf, -np.inf, 0.0, -0.0, 1000.0, -1e9]  # F8_E4M3 saturates like torch
    codes = ["BF16", "F16", "F8_E4M3", "F8_E5M2", "F64"]
    specs = [TensorSpec(c, c, x.shape) for c in codes]
    with StreamingWriter(tmp_path / "c.safetensors", specs) as w:
        for c in codes:
            w.write(c, x)
            w.finish_tensor(c)
    loaded = safetensors.torch.load_file(tmp_path / "c.safetensors")
    for c in codes:
        expected = torch.from_numpy(x).to(TORCH_DTYPES[c])
        assert torch_bytes(loaded[c]) == torch_bytes(expected), c


names_st = st.text(min_size=1, max_size=12).filter(lambda s: s != "__metadata__")
tensor_st = st.tuples(
    st.sampled_from(sorted(DTYPES)),
    st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple),
    st.integers(0, 2**16),
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    spec=st.dictionaries(names_st, tensor_st, max_size=6),
    shard_size=st.one_of(st.none(), st.integers(1, 64)),
)
def test_random_tensor_dicts_round_trip(tmp_path_factory, spec, shard_size):
    tensors = {n: (c, random_bits(c, s, seed), s) for n, (c, s, seed) in spec.items()}
    out = tmp_path_factory.mktemp("h") / ("x.safetensors" if shard_size is None else "x")
    write_ours(out, tensors, shard_size=shard_size)
    files = [out] if shard_size is None else sorted(out.glob("*.safetensors"))
    official = {}
    for f in files:
        official.update(safetensors.torch.load_file(f))
    with open_checkpoint(out) as ckpt:
        assert list(ckpt) == list(tensors)
        for name, (code, bits, shape) in tensors.items():
            assert (ckpt[name].dtype, ckpt[name].shape) == (code, shape)
            assert ckpt[name].raw().tobytes() == bits.tobytes()
            assert torch_bytes(official[name]) == bits.tobytes()
