"""The counter-based random bits behind DARE and DELLA masks (mmerge.backend.rng and each backend
object's `keep_mask`, numpy's in uint32)."""

import math

import numpy as np
import pytest
from helpers import BACKENDS, to_numpy

from conformance import reference
from mmerge import backend
from mmerge.backend import rng

NAME = "model.layers.0.mlp.up_proj.weight"


def keys(seed=0, name=NAME, stream=0):
    return rng.stream_keys(seed, name, stream)


def python_bits(seed: int, name: str, stream: int, indices) -> list[int]:
    """spec/methods.md section 2.2 in plain Python integers, one index at a time."""
    k0, k1 = keys(seed, name, stream)

    def mix(x):
        for last in (False, False, True):
            x ^= x >> 16
            if not last:
                x = (x * 0x045D9F3B) % 2**32
        return x

    return [mix((i % 2**32) ^ k0 ^ mix((i // 2**32) ^ k1)) for i in indices]


def test_frozen_reference_values():
    """These values are part of the spec: changing the hash changes every DARE merge."""
    got = rng.random_bits(np, 6, keys(0, "model.embed_tokens.weight"))
    assert got.tolist() == [1825807334, 95499699, 4052173703, 4111970000, 2786681510, 1152710924]
    far = rng.random_bits(np, 4, keys(7, "lm_head.weight", 1), start=2**33 + 5)
    assert far.tolist() == [713976023, 1463599991, 2996085451, 381775320]


def test_matches_plain_python_integers_across_the_2_32_boundary():
    start = 2**32 - 50  # crosses the boundary where the high part starts to count
    got = rng.random_bits(np, 100, keys(3, NAME, 2), start=start).tolist()
    assert got == python_bits(3, NAME, 2, range(start, start + 100))
    assert got == reference.random_bits(100, 3, NAME, 2, start).tolist()


@pytest.mark.parametrize("be", BACKENDS)
def test_keep_mask_identical_on_every_backend(be):
    on = backend.get(be)
    start = 2**32 - 1000
    want = reference.random_bits(2000, 11, NAME, 0, start) < reference.keep_threshold(0.3)
    got = on.keep_mask(2000, rng.keep_threshold(0.3), keys(11), start)
    assert np.array_equal(to_numpy(got), want)
    portable = rng.keep_mask(on.xp, 2000, rng.keep_threshold(0.3), keys(11), start)
    assert np.array_equal(to_numpy(portable), want)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
def test_keep_rate_is_p(p):
    n = 200_000
    kept = backend.get("numpy").keep_mask(n, rng.keep_threshold(p), keys(5))
    bound = 5 * math.sqrt(p * (1 - p) / n)  # 5 binomial standard deviations
    assert abs(kept.mean() - p) < bound


def test_bits_are_uniform_and_uncorrelated():
    v = rng.random_bits(np, 1 << 16, keys()) / 2.0**32
    counts, _ = np.histogram(v, bins=64, range=(0, 1))
    expected = v.size / 64
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 120  # 63 degrees of freedom: p ~ 1e-5
    assert abs(np.corrcoef(v[:-1], v[1:])[0, 1]) < 0.02
    other = rng.random_bits(np, 1 << 16, keys(stream=1)) / 2.0**32
    assert abs(np.corrcoef(v, other)[0, 1]) < 0.02  # two models' masks are independent


def test_chunking_does_not_change_the_mask():
    on = backend.get("numpy")
    cut = rng.keep_threshold(0.4)
    whole = on.keep_mask(200_000, cut, keys(1))
    parts = [
        on.keep_mask(hi - lo, cut, keys(1), lo)
        for lo, hi in [(0, 3), (3, 70_001), (70_001, 200_000)]
    ]
    assert np.array_equal(whole, np.concatenate(parts))


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("cut", [0, 1, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1, 2**32])
def test_keep_mask_at_extreme_thresholds(be, cut):
    # backends may compare 32-bit values in signed arithmetic: the cuts around the sign bit
    on = backend.get(be)
    start = 2**31 - 700
    want = reference.random_bits(3000, 4, NAME, 0, start) < cut
    assert np.array_equal(to_numpy(on.keep_mask(3000, cut, keys(4), start)), want)


@pytest.mark.parametrize("be", BACKENDS)
def test_per_element_thresholds(be):
    on = backend.get(be)
    p = np.linspace(0, 1, 1000)
    cut = on.from_host(np.floor(p * 2**32).astype(np.int64))
    got = to_numpy(on.keep_mask(1000, cut, keys(2, NAME, 1)))
    want = reference.random_bits(1000, 2, NAME, 1) < reference.keep_threshold(p)
    assert np.array_equal(got, want)
    assert got[-1] and not got[0]  # p = 1 always kept, p = 0 never


@pytest.mark.parametrize(
    "other",
    [dict(seed=1), dict(name=NAME + "x"), dict(stream=1)],
    ids=["seed", "name", "stream"],
)
def test_seed_name_and_stream_change_the_bits(other):
    a = rng.random_bits(np, 1000, keys())
    b = rng.random_bits(np, 1000, keys(**other))
    assert (a == b).mean() < 0.01


def test_keep_threshold_bounds():
    assert rng.keep_threshold(0.0) == 0
    assert rng.keep_threshold(1.0) == 2**32  # every 32-bit value is below it
    assert rng.keep_threshold(0.5) == 2**31
    assert rng.keep_threshold(1.5) == 2**32
    assert backend.get("numpy").keep_mask(5, 2**32, keys()).all()


def test_keys_use_blake2b_not_python_hash():
    import hashlib

    digest = hashlib.blake2b(
        (0).to_bytes(8, "little") + (0).to_bytes(4, "little") + b"w",
        digest_size=8,
        person=b"mmerge-rng32",
    ).digest()
    want = (int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little"))
    assert rng.stream_keys(0, "w") == want


def test_empty_mask():
    assert backend.get("numpy").keep_mask(0, 5, keys()).shape == (0,)
    assert rng.keep_mask(np, 0, 5, keys()).shape == (0,)


@pytest.mark.parametrize("cut", [0, 1, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1, 2**32, "per entry"])
def test_torch_device_form_on_the_cpu(cut):
    """Torch's int32 form (what a GPU runs; the CPU takes numpy's) gives the reference bits,
    across the 2**32 boundary and the sign bit, for one cut and per-entry cuts."""
    torch = pytest.importorskip("torch")
    on = backend.get("torch", "cpu")
    start = 2**32 - 1500
    if cut == "per entry":
        p = np.linspace(0, 1, 3000)
        threshold = torch.from_numpy(np.floor(p * 2**32).astype(np.int64))
        want = reference.random_bits(3000, 4, NAME, 0, start) < reference.keep_threshold(p)
    else:
        threshold = cut
        want = reference.random_bits(3000, 4, NAME, 0, start) < cut
    got = on.device_keep_mask(3000, threshold, keys(4), start)
    assert got.dtype == torch.bool and np.array_equal(got.numpy(), want)
