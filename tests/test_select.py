"""Exact selection of the largest entries in streamed passes (mmerge.methods.select): whole or
chunked, on every backend, in float32 and float64, and by every route (gathering the whole
statistic, counting bits then gathering the bin, counting alone), it keeps exactly what the
reference ranking keeps (index rule) or every entry >= the k-th largest (the TIES paper's
rule)."""

import numpy as np
import pytest
from helpers import BACKENDS, grid, to_backend, to_numpy

from conformance import reference
from mmerge import backend
from mmerge.methods import ties
from mmerge.methods.contract import Chunk, Job
from mmerge.methods.select import Selection
from mmerge.methods.sparsify import band_sizes, top_count

# how many bytes the job may hold: everything (one gathering pass), one byte less than the
# whole statistic (counting, then gathering the bin), nothing (counting alone)
ROUTES = {"gather": lambda n: None, "bin": lambda n: 4 * n - 1, "count": lambda n: 0}


def select(
    values: np.ndarray, ks, be="numpy", chunk=None, ties_rule="index", block=64, route="gather"
):
    """The masks a Selection with these k keeps on the flat `values` (one stream), computed
    over chunks of `chunk` entries (whole blocks of `block`), by `route` (see ROUTES)."""
    compute = "float64" if values.dtype == np.float64 else "float32"
    job = Job(ties, {}, (values.size,), 1, True, "x", compute, hold=ROUTES[route](values.size))
    job.__dict__["block"] = block  # cached_property: small blocks, many of them
    selection = Selection(
        "pick",
        lambda job, chunk: [chunk.models[0]],
        lambda job, n, z: [tuple(ks)],
        ties_rule,
        streams=lambda job: 1,
    )
    x = to_backend(be, values)
    xp = backend.namespace(x)
    step = chunk or values.size
    n = values.size
    chunks = [Chunk(xp, [x[s : min(s + step, n)]], None, s) for s in range(0, n, step)]

    for p in selection.passes(job):  # each pass reads what the earlier ones found
        total = None
        for c in chunks:
            part = p.measure(job, c)
            total = part if total is None else p.combine(total, part)
        job.stats[p.name] = p.finish(job, total)
    out = []
    for which in range(len(ks)):
        parts = [to_numpy(selection.mask(job, c, c.models[0], 0, which)) for c in chunks]
        out.append(np.concatenate(parts))
    return out


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("step", [2.0**-3, 2.0**-12], ids=["many-ties", "few-ties"])
@pytest.mark.parametrize("chunk", [None, 64, 192])
@pytest.mark.parametrize("route", ROUTES)
def test_top_k_matches_the_reference_ranking(be, step, chunk, route):
    a = np.abs(grid(np.random.default_rng(0), (24 * 37,), step=step))
    ks = (1, 2, 100, 444, 887, 888)
    for k, got in zip(ks, select(a, ks, be, chunk, route=route)):
        assert got.sum() == k
        assert np.array_equal(got, reference.top_k_mask(a, k)), k


@pytest.mark.parametrize("chunk", [None, 3, 6])
@pytest.mark.parametrize("route", ROUTES)
def test_ties_at_the_threshold_go_to_the_lower_index(chunk, route):
    a = np.abs(np.array([1, -3, 3, 2, -3, 3, 0], dtype=np.float32))
    two, five = select(a, (2, 5), chunk=chunk, block=3, route=route)
    assert two.tolist() == [False, True, True, False, False, False, False]
    assert five.tolist() == [False, True, True, True, True, True, False]


@pytest.mark.parametrize("route", ROUTES)
def test_all_equal_magnitudes_and_k_out_of_range(route):
    a = np.full(6, 2.0, np.float32)
    assert select(a, (4,), chunk=2, block=2, route=route)[0].tolist() == [1, 1, 1, 1, 0, 0]
    none, every, more = select(np.arange(6, dtype=np.float32), (0, 6, 9), route=route)
    assert not none.any() and every.all() and more.all()


@pytest.mark.parametrize("route", ROUTES)
def test_the_papers_rule_keeps_every_tie(route):
    a = np.abs(np.array([1, -3, 3, 2, -3, 3, 0], dtype=np.float32))
    got = select(a, (2,), chunk=3, block=3, ties_rule="all", route=route)[0]
    assert got.tolist() == [0, 1, 1, 0, 1, 1, 0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("route", ROUTES)
def test_extreme_values_are_exact(dtype, route):
    tiny = np.finfo(dtype).smallest_subnormal
    a = np.array([tiny, 3 * tiny, 2 * tiny, 0.0, np.finfo(dtype).max, 1.0], dtype)
    for k in range(1, 7):
        got = select(a, (k,), chunk=2, block=2, route=route)[0]
        assert np.array_equal(got, reference.top_k_mask(a, k)), k


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("route", ROUTES)
def test_band_matches_the_reference(be, route):
    a = np.abs(grid(np.random.default_rng(1), (1000,), step=2.0**-4))
    for density, gamma in [(0.01, 0.0), (0.5, 0.01), (0.003, 0.0), (0.001, 0.999), (1.0, 0.0)]:
        skip, keep = band_sizes(density, gamma, a.size) if density < 1 else (0, a.size)
        inner, outer = select(a, (skip + keep, skip), be, chunk=128, route=route)
        got = inner & ~outer
        assert np.array_equal(got, reference.band_mask(a, density, gamma)), (density, gamma)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_each_route_runs_the_passes_it_names(dtype):
    """What the job may hold decides the passes: one gathering pass; counting the top 16 bits,
    then gathering the bin; or counting 16 bits at a time, then the tied entries per block."""
    a = np.abs(grid(np.random.default_rng(2), (24 * 37,), step=2.0**-3)).astype(dtype)
    levels = 2 if dtype == np.float32 else 4
    expected = {
        "gather": ["pick.gather"],
        "bin": ["pick.0", "pick.gather"],
        "count": [f"pick.{level}" for level in range(levels)] + ["pick.ties"],
    }
    for route, names in expected.items():
        job = Job(ties, {}, (a.size,), 1, True, "x", "float64" if levels == 4 else "float32")
        job.hold = ROUTES[route](a.size) if route != "bin" else a.size * a.itemsize - 1
        selection = Selection(
            "pick", lambda job, chunk: [chunk.models[0]], lambda job, n, z: [(400,)]
        )
        chunk = Chunk(backend.namespace(a), [a], None, 0)
        seen = []
        for p in selection.passes(job):
            seen.append(p.name)
            job.stats[p.name] = p.finish(job, p.measure(job, chunk))
        assert seen == names, route
        assert np.array_equal(selection.mask(job, chunk, a, 0), reference.top_k_mask(a, 400))


def test_top_count_follows_mergekit():
    assert top_count(0.5, 10) == 5
    assert top_count(0.01, 10) == 1  # at least one entry survives
    assert top_count(0.29, 100) == 28  # int(0.29 * 100) in float64, as mergekit
    assert top_count(1.0, 7) == 7
