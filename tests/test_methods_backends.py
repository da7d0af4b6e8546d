"""Bit-identical results across backends where spec/methods.md promises them: elementwise
float32 arithmetic, masks, the DARE/DELLA random drop and the fixed-order L1 sums."""

import numpy as np
import pytest
from references import BACKENDS, grid, to_backend, to_numpy

import mmerge.methods as M

RNG = np.random.default_rng(7)
SHAPE = (33, 65)  # odd sizes exercise the fixed-order sum's carries
BASE = RNG.standard_normal(SHAPE).astype(np.float32)  # continuous values: real rounding
MODELS = [BASE + 0.01 * RNG.standard_normal(SHAPE).astype(np.float32) for _ in range(3)]
NAME = "model.layers.0.mlp.down_proj.weight"

BIT_EXACT = {
    "linear": ({"weight": [0.3, 0.3, 0.4]}, False),
    "task_arithmetic": ({"weight": [0.7, 0.2, 0.5], "lambda": 0.9}, True),
    "ties": ({"density": [0.3, 0.5, 0.7], "weight": [1.0, 0.6, 0.3]}, True),
    "dare_linear": ({"density": 0.3, "seed": 7}, True),
    "dare_ties": ({"density": 0.3, "seed": 7}, True),
    "breadcrumbs": ({"density": 0.4, "gamma": 0.05}, True),
    "breadcrumbs_ties": ({"density": 0.4, "gamma": 0.05}, True),
    "della": ({"density": 0.5, "epsilon": 0.1, "seed": 3}, True),
    "della_linear": ({"density": 0.5, "epsilon": 0.1, "rescale": "inverse_density"}, True),
    "sce": ({"select_topk": 0.4}, True),
    "nearswap": ({"t": 0.005}, False),
}


def merged(be, name):
    params, with_base = BIT_EXACT[name]
    models = MODELS[:2] if name == "nearswap" else MODELS
    out = M.get(name)(
        [to_backend(be, m) for m in models],
        base=to_backend(be, BASE) if with_base else None,
        tensor_name=NAME,
        **params,
    )
    return to_numpy(out)


@pytest.mark.parametrize("be", [p for p in BACKENDS if p.values[0] != "numpy"])
@pytest.mark.parametrize("name", sorted(BIT_EXACT))
def test_same_bits_as_numpy(be, name):
    assert np.array_equal(merged(be, name), merged("numpy", name))


def test_dare_ties_seed_matters():
    params = dict(density=0.3, tensor_name=NAME)
    one = M.dare_ties(MODELS, base=BASE, seed=7, **params)
    assert not np.array_equal(one, M.dare_ties(MODELS, base=BASE, seed=8, **params))


@pytest.mark.parametrize("be", BACKENDS)
def test_fixed_order_sum_is_exact_on_integers_and_identical(be):
    from mmerge import backend
    from mmerge.methods._common import fixed_order_sum

    a = grid(np.random.default_rng(1), (1001,), step=2.0**-20) * 1000
    x = to_backend(be, a)
    xp = backend.namespace(x)
    assert fixed_order_sum(xp, x) == fixed_order_sum(backend.namespace(a), a)
    assert fixed_order_sum(xp, xp.ones((7, 3), dtype=xp.float32)) == 21.0
