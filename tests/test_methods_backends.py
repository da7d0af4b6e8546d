"""Bit-identical pieces of spec/methods.md across backends: the fixed-order block sums behind the
L1 rescale and SCE's weights, and the seed of the random drop. (Whole methods are compared with
numpy, bit for bit where the registry declares them exact, by conformance/test_agreement.py.)"""

import numpy as np
import pytest
from helpers import BACKENDS, grid, to_backend

import mmerge.methods as M
from mmerge import backend
from mmerge.methods.contract import halving_sums

NAME = "model.layers.0.mlp.down_proj.weight"


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("block", [1, 7, 64, 1 << 16])
def test_halving_sums_are_identical_on_every_backend(be, block):
    a = np.random.default_rng(1).standard_normal(1001).astype(np.float32) * 1000
    x = to_backend(be, a)
    got = halving_sums(backend.namespace(x), x, block).rows
    want = halving_sums(backend.namespace(a), a, block).rows
    assert got.shape == (-(-a.size // block), 1)
    assert np.array_equal(got, want)


def test_halving_sums_are_exact_on_integers():
    a = grid(np.random.default_rng(2), (1001,), step=1.0) * 10
    sums = halving_sums(backend.namespace(a), a, 64)
    assert sums.total()[0] == a.astype(np.float64).sum()
    ones = np.ones((7, 3), np.float32).reshape(-1)
    assert halving_sums(backend.namespace(ones), ones, 5).total()[0] == 21.0


def test_dare_ties_seed_matters():
    rng = np.random.default_rng(7)
    base = rng.standard_normal((33, 65)).astype(np.float32)
    models = [base + 0.01 * rng.standard_normal(base.shape).astype(np.float32) for _ in range(3)]
    params = dict(density=0.3, tensor_name=NAME)
    one = M.dare_ties(models, base=base, seed=7, **params)
    assert not np.array_equal(one, M.dare_ties(models, base=base, seed=8, **params))
