"""The counter-based random bits behind DARE and DELLA masks (mmerge.backend.rng)."""

import math

import numpy as np
import pytest
from references import BACKENDS, ref_bits, ref_keep, to_backend, to_numpy

from mmerge import backend
from mmerge.backend import rng

NAME = "model.layers.0.mlp.up_proj.weight"


def xp_of(be):
    return backend.namespace(to_backend(be, np.zeros(1, np.float32)))


def test_frozen_reference_values():
    """These values are part of the spec: changing the hash changes every DARE merge."""
    xp = xp_of("numpy")
    got = to_numpy(rng.random_bits(xp, 6, seed=0, name="model.embed_tokens.weight"))
    assert got.tolist() == [760490806, 1639405784, 60189159, 1582760765, 201499417, 4721962]
    far = rng.random_bits(xp, 4, seed=7, name="lm_head.weight", stream=1, start=2**33 + 5)
    assert to_numpy(far).tolist() == [274204451, 1196035822, 1379507837, 1696848867]


def test_matches_independent_integer_reference():
    xp = xp_of("numpy")
    start = 2**31 - 50  # crosses the 2**31 boundary where the high part starts to count
    got = to_numpy(rng.random_bits(xp, 100, seed=3, name=NAME, stream=2, start=start))
    assert np.array_equal(got, ref_bits(3, NAME, 2, range(start, start + 100)))


@pytest.mark.parametrize("be", BACKENDS)
def test_bits_identical_on_every_backend(be):
    xp = xp_of(be)
    want = ref_bits(11, NAME, 0, range(2**31 - 1000, 2**31 + 1000))
    got = rng.random_bits(xp, 2000, seed=11, name=NAME, start=2**31 - 1000)
    assert np.array_equal(to_numpy(got), want)
    mask = rng.keep_mask(xp, 2000, rng.keep_threshold(0.3), seed=11, name=NAME, start=2**31 - 1000)
    assert np.array_equal(to_numpy(mask), want < math.floor(0.3 * 2**31))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
def test_keep_rate_is_p(p):
    n = 200_000
    kept = to_numpy(rng.keep_mask(xp_of("numpy"), n, rng.keep_threshold(p), seed=5, name=NAME))
    bound = 5 * math.sqrt(p * (1 - p) / n)  # 5 binomial standard deviations
    assert abs(kept.mean() - p) < bound


def test_bits_are_uniform_and_uncorrelated():
    v = to_numpy(rng.random_bits(xp_of("numpy"), 1 << 16, seed=0, name=NAME)) / 2.0**31
    counts, _ = np.histogram(v, bins=64, range=(0, 1))
    expected = v.size / 64
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 120  # 63 degrees of freedom: p ~ 1e-5
    assert abs(np.corrcoef(v[:-1], v[1:])[0, 1]) < 0.02


def test_chunking_does_not_change_the_mask(monkeypatch):
    xp = xp_of("numpy")
    cut = rng.keep_threshold(0.4)
    whole = to_numpy(rng.keep_mask(xp, 10_000, cut, seed=1, name=NAME))
    parts = [
        to_numpy(rng.keep_mask(xp, hi - lo, cut, seed=1, name=NAME, start=lo))
        for lo, hi in [(0, 3), (3, 4100), (4100, 10_000)]
    ]
    assert np.array_equal(whole, np.concatenate(parts))
    monkeypatch.setattr(rng, "CHUNK", 97)  # internal blocks of another size
    assert np.array_equal(whole, to_numpy(rng.keep_mask(xp, 10_000, cut, seed=1, name=NAME)))


def test_per_element_thresholds():
    xp = xp_of("numpy")
    p = np.linspace(0, 1, 1000)
    cut = xp.asarray(np.floor(p * 2**31).astype(np.int64))
    got = to_numpy(rng.keep_mask(xp, 1000, cut, seed=2, name=NAME, stream=1))
    assert np.array_equal(got, ref_keep(2, NAME, 1, p, 1000))
    assert got[-1] and not got[0]  # p = 1 always kept, p = 0 never


@pytest.mark.parametrize(
    "other",
    [dict(seed=1), dict(name=NAME + "x"), dict(stream=1)],
    ids=["seed", "name", "stream"],
)
def test_seed_name_and_stream_change_the_bits(other):
    xp = xp_of("numpy")
    args = dict(seed=0, name=NAME, stream=0) | other
    a = to_numpy(rng.random_bits(xp, 1000, seed=0, name=NAME))
    b = to_numpy(rng.random_bits(xp, 1000, **args))
    assert (a == b).mean() < 0.01


def test_keep_threshold_bounds():
    assert rng.keep_threshold(0.0) == 0
    assert rng.keep_threshold(1.0) == 2**31  # every 31-bit value is below it
    assert rng.keep_threshold(0.5) == 2**30
    assert rng.keep_threshold(1.5) == 2**31


def test_keys_use_blake2b_not_python_hash():
    import hashlib

    digest = hashlib.blake2b(
        (0).to_bytes(8, "little") + (0).to_bytes(4, "little") + b"w",
        digest_size=12,
        person=b"mmerge-rng",
    ).digest()
    want = tuple(int.from_bytes(digest[i : i + 4], "little") & (2**31 - 1) for i in (0, 4, 8))
    assert rng.stream_keys(0, "w") == want


def test_empty_mask():
    assert to_numpy(rng.keep_mask(xp_of("numpy"), 0, 5, seed=0, name=NAME)).shape == (0,)
