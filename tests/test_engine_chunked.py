"""The engine runs every method's passes and apply over chunks; the result must be bit-identical
to the method applied to whole tensors in memory (`merge_tensors`), for every registered method
and every case of its spec vectors, on numpy, torch and MLX (whose lazy arrays must be computed
in the chunk task's thread), with many chunks per tensor, each worked on in uneven tiles,
whatever a merge may hold between its passes (so whichever passes find its statistics)."""

import threading

import numpy as np
import pytest

import mmerge
import mmerge.backend
from conformance.vectors import available, load
from mmerge.engine.execute import HOLD, Execution, Runner, chunk_bounds, job_for
from mmerge.engine.output import OutputOptions, write_plan
from mmerge.engine.plan import Source, build_plan
from mmerge.io import open_checkpoint
from mmerge.methods import contract, get
from mmerge.testing import write_model_family

CASES = [(m, c["id"]) for m in available() for c in load(m)["cases"]]
MODEL_SCOPE = [
    ("ties", {"density": 0.2, "scope": "model"}),
    ("ties", {"density": [0.3, 0.5], "scope": "model", "election": "sum"}),
    ("breadcrumbs_ties", {"density": 0.4, "gamma": 0.05, "scope": "model"}),
    ("ties", {"density": 0.4, "scope": "model", "rescale": "l1"}),
]


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory):
    # bf16 values quantize the task vectors, so magnitudes tie at the trim threshold
    out = tmp_path_factory.mktemp("bf16")
    return write_model_family(
        out,
        hidden=16,
        intermediate=40,
        layers=2,
        vocab=64,
        dtype="BF16",
        layout="file",
        seed=5,
        n_finetunes=3,
    )


def load_tensors(path, backend="numpy"):
    on = mmerge.backend.get(backend)
    with open_checkpoint(path) as ckpt:
        return {n: on.from_host(np.array(r.to_numpy())) for n, r in ckpt.items()}


# bytes a merge may hold between passes: the engine's budget (every tensor here fits), a few
# kilobytes (the larger tensors count bits first), nothing (passes count bits alone)
HOLDS = {"hold-all": HOLD, "hold-some": 2000, "hold-none": 0}


def merged_both_ways(family, method, n, with_base, params, backend, tmp_path, hold=HOLD):
    """(engine result, merge_tensors result) as {name: float32 array}."""
    names = [f"ft{i + 1}" for i in range(n)]
    ckpts = [open_checkpoint(family[k]) for k in names]
    base = open_checkpoint(family["base"]) if with_base else None
    sources = [Source(c, {}, label=k) for c, k in zip(ckpts, names)]
    plan = build_plan(
        sources,
        method=method,
        base=None if base is None else Source(base, {}, "base"),
        params=params,
        out_dtype="float32",
    )
    # chunks of three blocks, worked on in tiles of two blocks and one
    run = Execution(backend=backend, chunk_elements=96, tile_elements=64, hold=hold)
    embed = next(i for i in plan.items if i.name == "model.embed_tokens.weight")
    if not embed.is_copy:  # the big tensor really takes many chunks
        assert len(chunk_bounds(embed.numel, job_for(embed, "float32").block, 96)) > 5
    everything = ckpts + ([base] if base else [])
    out = write_plan(plan, everything, OutputOptions(tmp_path / "out.safetensors"), run)
    want = mmerge.merge_tensors(
        [load_tensors(family[k], backend) for k in names],
        method=method,
        base=None if base is None else load_tensors(family["base"], backend),
        **params,
    )
    for c in everything:
        c.close()
    return load_tensors(out), {k: mmerge.backend.to_host(v) for k, v in want.items()}


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(contract, "BLOCK", 32)  # exact sums over blocks of 32 entries


RUNS = [  # every case with the engine's budget; those of methods with passes with every budget
    pytest.param(m, c, hold, id=f"{m}-{c}-{name}")
    for m, c in CASES
    for name, hold in HOLDS.items()
    if hold == HOLD or get(m).passes
]


@pytest.mark.parametrize(("method", "case_id", "hold"), RUNS)
@pytest.mark.parametrize("backend", ["numpy", "torch", "mlx"])
def test_chunked_merge_equals_whole_tensor_merge(
    method, case_id, hold, backend, bf16_family, tmp_path, small_blocks
):
    ok, why = mmerge.backend.available(backend)
    if not ok:
        pytest.skip(why)
    case = next(c for c in load(method)["cases"] if c["id"] == case_id)
    got, want = merged_both_ways(
        bf16_family,
        method,
        len(case["models"]),
        case["base"] is not None,
        case["params"],
        backend,
        tmp_path,
        hold,
    )
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.parametrize(("method", "params"), MODEL_SCOPE)
@pytest.mark.parametrize("hold", HOLDS.values(), ids=HOLDS.keys())
def test_chunked_model_scope_equals_in_memory(
    method, params, hold, bf16_family, tmp_path, small_blocks
):
    """Passes over the whole model span every tensor, streamed or in memory alike."""
    got, want = merged_both_ways(bf16_family, method, 2, True, params, "numpy", tmp_path, hold)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


class _Job:
    """A stand-in job with one tensor-scope pass, whose finish may wait for another's measure."""

    def __init__(self, index, finish):
        self.index, self.stats = index, {}
        self.pass_ = contract.Pass("p", lambda job, chunk: None, finish)

    def passes(self):
        return iter([self.pass_])


def test_overlapped_passes_finish_one_tensor_beside_the_next_ones_chunks():
    measured = [threading.Event() for _ in range(3)]
    ready = []

    def finish(job, total):
        if job.index == 0:  # tensor 0's finish needs tensor 1 measured meanwhile: overlap only
            assert measured[1].wait(10), "tensor 1 was not measured during tensor 0's finish"
        if job.index == 2:
            raise ValueError("tensor 2 is broken")
        return total * 10

    def measure(i, p):
        measured[i].set()
        return i + 1

    jobs = [_Job(i, finish) for i in range(3)]
    with pytest.raises(ValueError, match="tensor 2 is broken"):
        contract.run_passes(jobs, measure, ready.append, overlap=2)
    assert ready == [0, 1]  # in job order, and none after the failure
    assert [j.stats.get("p") for j in jobs] == [10, 20, None]


def test_cancelled_chunk_tasks_give_their_bytes_back():
    # after an error the engine cancels queued tasks; a pass thread still waiting for room in
    # the budget must get it, or it never ends
    runner = Runner([], None, Execution(workers=1))
    started, go = threading.Event(), threading.Event()

    def blocking():
        started.set()
        assert go.wait(10)

    with runner.working():
        first = runner.submit(blocking, 100)
        queued = runner.submit(lambda: None, 200)
        assert started.wait(10) and queued.cancel()
        assert runner.budget.used == 100
        go.set()
        first.result()
    assert runner.budget.used == 0
