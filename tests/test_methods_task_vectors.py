"""Task-vector methods against their float64 references, on every backend."""

import numpy as np
import pytest
from helpers import BACKENDS, REF, assert_close, grid, to_backend, to_numpy

import mmerge.methods as M

NAME = "model.layers.3.self_attn.q_proj.weight"


def family(seed=0, shape=(16, 24), models=3, step=2.0**-10):
    rng = np.random.default_rng(seed)
    base = grid(rng, shape, step=step)
    return [base + grid(rng, shape, 0.1, step) for _ in range(models)], base


def run(be, spec, models, base=None, **params):
    out = spec(
        [to_backend(be, m) for m in models],
        base=None if base is None else to_backend(be, base),
        **params,
    )
    assert type(out).__module__.split(".")[0] == type(to_backend(be, base)).__module__.split(".")[0]
    return to_numpy(out)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic(be, normalize):
    models, base = family()
    w = [0.7, -0.4, 1.1]
    got = run(be, M.task_arithmetic, models, base, weight=w, normalize=normalize, **{"lambda": 0.8})
    want = REF.task_arithmetic(models, base, weight=w, normalize=normalize, **{"lambda": 0.8})
    assert_close(got, want)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("election", ["weighted_sum", "sum", "count"])
def test_ties(be, election):
    models, base = family(step=2.0**-7)  # coarse grid: many magnitude ties
    w, dens = [1.0, 0.5, 0.8], [0.3, 0.5, 0.2]
    got = run(be, M.ties, models, base, weight=w, density=dens, election=election)
    want = REF.ties(models, base, weight=w, density=dens, election=election)
    assert_close(got, want)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("rescale", ["l1", "inverse_density"])
def test_ties_with_rescale_and_lambda(be, rescale):
    models, base = family(1)
    got = run(
        be, M.ties, models, base, density=0.4, rescale=rescale, normalize=False, **{"lambda": 1.5}
    )
    want = REF.ties(models, base, density=0.4, rescale=rescale, normalize=False, **{"lambda": 1.5})
    assert_close(got, want)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("rescale", ["l1", "inverse_density", "none"])
def test_dare_linear(be, rescale):
    models, base = family(2)
    w = [0.6, 0.4, 1.0]
    got = run(
        be,
        M.dare_linear,
        models,
        base,
        weight=w,
        density=0.3,
        rescale=rescale,
        seed=9,
        tensor_name=NAME,
    )
    want = REF.dare_linear(
        models, base, weight=w, density=0.3, rescale=rescale, seed=9, tensor_name=NAME
    )
    assert_close(got, want)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True])
def test_dare_ties(be, normalize):
    models, base = family(3)
    dens = [0.2, 0.5, 0.9]
    got = run(
        be, M.dare_ties, models, base, density=dens, normalize=normalize, seed=4, tensor_name=NAME
    )
    want = REF.dare_ties(models, base, density=dens, normalize=normalize, seed=4, tensor_name=NAME)
    assert_close(got, want)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("gamma", [0.0, 0.01, 0.2])
def test_breadcrumbs(be, gamma):
    models, base = family(4, step=2.0**-8)
    got = run(be, M.breadcrumbs, models, base, weight=[0.5, 0.3, 0.2], density=0.4, gamma=gamma)
    want = REF.breadcrumbs(models, base, weight=[0.5, 0.3, 0.2], density=0.4, gamma=gamma)
    assert_close(got, want)


@pytest.mark.parametrize("be", BACKENDS)
def test_breadcrumbs_ties_drops_fewer_outliers_when_density_needs_them(be):
    models, base = family(5)
    got = run(be, M.breadcrumbs_ties, models, base, density=0.9, gamma=0.3)
    want = REF.breadcrumbs_ties(models, base, density=0.9, gamma=0.3)
    assert_close(got, want)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("rescale", ["l1", "inverse_density", "none"])
def test_della(be, rescale):
    models, base = family(6)
    got = run(
        be,
        M.della,
        models,
        base,
        density=0.5,
        epsilon=0.2,
        rescale=rescale,
        seed=3,
        tensor_name=NAME,
        **{"lambda": 0.9},
    )
    want = REF.della(
        models,
        base,
        density=0.5,
        epsilon=0.2,
        rescale=rescale,
        seed=3,
        tensor_name=NAME,
        **{"lambda": 0.9},
    )
    assert_close(got, want)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("shape", [(40,), (4, 5, 6), (7, 1)])
def test_della_linear_ranks_along_axis_1(be, shape):
    models, base = family(7, shape=shape, models=2)
    got = run(
        be,
        M.della_linear,
        models,
        base,
        weight=[0.3, 0.7],
        density=[0.4, 0.6],
        epsilon=0.1,
        seed=1,
        tensor_name=NAME,
    )
    want = REF.della_linear(
        models,
        base,
        weight=[0.3, 0.7],
        density=[0.4, 0.6],
        epsilon=0.1,
        seed=1,
        tensor_name=NAME,
    )
    assert_close(got, want)


@pytest.mark.parametrize("rescale", ["l1", "inverse_density", "none"])
def test_della_ranks_each_row_once(monkeypatch, rescale):
    """The drop and the rescale share one ranking, and the l1 pass hands its masks to the
    apply: each model's rows are ranked once, whatever the rescale."""
    from mmerge.backend.numpy_backend import NumpyBackend

    ranked = []
    ranks = NumpyBackend.ranks
    monkeypatch.setattr(
        NumpyBackend, "ranks", lambda self, a, axis: ranked.append(a.shape) or ranks(self, a, axis)
    )
    models, base = family(6, shape=(6, 5), models=3)
    M.della(models, base=base, density=0.5, epsilon=0.2, rescale=rescale, seed=3)
    assert len(ranked) == 3


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("select_topk", [1.0, 0.3])
def test_sce(be, select_topk):
    models, base = family(8, step=2.0**-7)
    got = run(be, M.sce, models, base, select_topk=select_topk)
    assert_close(got, REF.sce(models, base, select_topk=select_topk))


def test_per_model_density_list_must_match_model_count():
    models, base = family()
    with pytest.raises(M.registry.InvalidInput, match="'density' has 2 values for 3 models"):
        M.ties(models, base=base, density=[0.5, 0.5])


def test_della_density_epsilon_bounds():
    models, base = family(models=2)
    with pytest.raises(M.registry.InvalidInput, match="density - epsilon > 0"):
        M.della(models, base=base, density=0.1, epsilon=0.15)
    with pytest.raises(M.registry.InvalidInput, match="model 1"):
        M.della(models, base=base, density=[0.5, 0.9], epsilon=0.15)
    M.della(models, base=base, density=1.0, epsilon=0.15)  # density 1 keeps all: no check
    M.della(models, base=base, density=0.85, epsilon=0.15)  # density + epsilon = 1 is fine


def test_dare_mask_differs_between_models_and_tensors():
    models, base = family(9, models=2)
    same = [models[0], models[0]]
    out = M.dare_linear(same, base=base, density=0.5, rescale="none", tensor_name="a")
    delta = out - base
    single = M.dare_linear(same[:1], base=base, density=0.5, rescale="none", tensor_name="a")
    assert not np.allclose(delta, 2 * (single - base))  # model 1 has its own mask
    other = M.dare_linear(same, base=base, density=0.5, rescale="none", tensor_name="b")
    assert not np.array_equal(out, other)
