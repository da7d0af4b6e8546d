"""Random drops (spec/methods.md): the keep mask depends only on (seed, tensor name, model,
flat index), so it is identical on every backend and equals the spec's reference bits; the
keep rate converges to density; `inverse_density` is unbiased over seeds; `l1` preserves the
L1 norm of the task vector."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conformance import reference
from conformance.cases import TENSOR_NAME
from conformance.run import Call, merge_on_host
from conformance.strategies import Inputs
from mmerge.methods import all_methods

RANDOM = sorted(spec.name for spec in all_methods() if spec.random)


def _single(delta: np.ndarray) -> Inputs:
    return Inputs([delta], np.zeros_like(delta), str(delta.dtype))


def _delta(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) + np.sign(rng.standard_normal(n)) * 0.1).astype(np.float32)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
def test_dare_mask_is_the_reference_mask(backend, name, density, seed):
    delta = _delta(3000, seed % 1000)
    call = Call(name, _single(delta), {"density": density, "seed": seed, "rescale": "none"})
    kept = merge_on_host(backend, call) != 0
    bits = reference.random_bits(delta.size, seed, TENSOR_NAME, 0)
    np.testing.assert_array_equal(kept, bits < reference.keep_threshold(density))


def test_dare_masks_differ_between_models_seeds_and_names(backend):
    delta = _delta(2000)
    two = Inputs([delta, delta], np.zeros_like(delta), "float32")
    params = {"density": 0.5, "rescale": "none", "weight": [1.0, 0.0]}
    first = merge_on_host(backend, Call("dare_linear", two, params)) != 0
    params["weight"] = [0.0, 1.0]
    second = merge_on_host(backend, Call("dare_linear", two, params)) != 0
    assert (first != second).any(), "models 0 and 1 drew the same mask"
    other_seed = Call("dare_linear", _single(delta), {"density": 0.5, "seed": 1, "rescale": "none"})
    assert ((merge_on_host(backend, other_seed) != 0) != first).any(), "seed ignored"


@pytest.mark.parametrize("name", RANDOM)
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_keep_rate_converges_to_density(backend, name, density):
    n = 20_000
    call = Call(name, _single(_delta(n)), {"density": density, "seed": 3, "rescale": "none"})
    if "della" in name:
        call.params["epsilon"] = 0.5 * min(density, 1 - density)
    rate = float(np.mean(merge_on_host(backend, call) != 0))
    sigma = math.sqrt(density * (1 - density) / n)
    assert abs(rate - density) <= 5 * sigma, f"keep rate {rate:.4f} for density {density}"


def test_inverse_density_is_unbiased_over_seeds(backend):
    delta, density, seeds = _delta(64), 0.3, 300
    total = np.zeros(delta.shape)
    for seed in range(seeds):
        params = {"density": density, "seed": seed, "rescale": "inverse_density"}
        total += merge_on_host(backend, Call("dare_linear", _single(delta), params))
    mean = total / seeds
    sigma = np.abs(delta) * math.sqrt((1 - density) / (density * seeds))
    assert np.all(np.abs(mean - delta) <= 6 * sigma + 1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("density", [0.05, 0.5, 0.95])
def test_l1_rescale_preserves_the_l1_norm(backend, dtype, density):
    if dtype not in backend.float_dtypes():
        dtype = "float32"
    delta = _delta(5000).astype(dtype)
    call = Call("dare_linear", _single(delta), {"density": density, "rescale": "l1", "seed": 5})
    got = float(np.sum(np.abs(merge_on_host(backend, call).astype(np.float64))))
    want = float(np.sum(np.abs(delta.astype(np.float64))))
    rtol = 1e-5 if dtype == "float32" else 1e-12
    assert abs(got - want) <= rtol * want, f"L1 {got} != {want}"
