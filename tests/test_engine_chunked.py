"""Large tensors of trim methods are merged chunk by chunk after a per-model prepare pass;
the result must be bit-identical to the method applied to the whole tensors in memory."""

import numpy as np
import pytest

import mmerge
from mmerge.engine.execute import Execution, tasks_for
from mmerge.engine.output import OutputOptions, write_plan
from mmerge.engine.plan import Source, build_plan
from mmerge.io import open_checkpoint
from mmerge.testing import write_model_family

CASES = [
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.5, "rescale": "l1", "election": "count"}),
    ("dare_ties", {"density": 0.4, "seed": 11}),
    ("dare_linear", {"density": 0.4, "seed": 11, "rescale": "inverse_density"}),
    ("breadcrumbs", {"density": 0.6, "gamma": 0.05}),
    ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.05, "rescale": "l1"}),
]


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory):
    # bf16 values quantize the task vectors, so magnitudes tie at the trim threshold
    out = tmp_path_factory.mktemp("bf16")
    return write_model_family(
        out, hidden=16, intermediate=40, layers=2, vocab=64, dtype="BF16", layout="file", seed=5
    )


def load(path):
    with open_checkpoint(path) as ckpt:
        return {n: np.array(r.to_numpy()) for n, r in ckpt.items()}


@pytest.mark.parametrize(
    ("method", "params"), CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)]
)
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_chunked_merge_equals_whole_tensor_merge(method, params, backend, bf16_family, tmp_path):
    if backend == "torch":
        pytest.importorskip("torch")
    fam = bf16_family
    ckpts = [open_checkpoint(fam[k]) for k in ("ft1", "ft2", "base")]
    sources = [Source(c, {}, label=k) for c, k in zip(ckpts[:2], ("ft1", "ft2"))]
    plan = build_plan(
        sources,
        method=method,
        base=Source(ckpts[2], {}, "base"),
        params=params,
        out_dtype="float32",
    )
    run = Execution(backend=backend, chunk_elements=96)
    # the big tensors really take the prepared, chunked path
    embed = next(i for i in plan.items if i.name == "model.embed_tokens.weight")
    assert len(tasks_for(embed, run.chunk_elements)) > 5
    out = write_plan(plan, ckpts, OutputOptions(tmp_path / "out.safetensors"), run)
    want = mmerge.merge_tensors(
        [load(fam["ft1"]), load(fam["ft2"])], method=method, base=load(fam["base"]), **params
    )
    got = load(out)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], np.asarray(value), err_msg=name)


@pytest.mark.parametrize("params", [{"t": 0.3}, {"t": 0.7, "magnitude": "norm_interp"}])
def test_chunked_slerp_equals_whole_tensor_slerp(params, bf16_family, tmp_path, monkeypatch):
    """slerp's norms and dot are summed over the same blocks in the same order either way."""
    from mmerge.methods import _common

    monkeypatch.setattr(_common, "SUM_BLOCK", 32)
    monkeypatch.setattr("mmerge.engine.execute.SUM_BLOCK", 32)
    fam = bf16_family
    ckpts = [open_checkpoint(fam[k]) for k in ("ft1", "ft2")]
    sources = [Source(c, {}, label=k) for c, k in zip(ckpts, ("ft1", "ft2"))]
    plan = build_plan(sources, method="slerp", params=params, out_dtype="float32")
    run = Execution(chunk_elements=96)
    embed = next(i for i in plan.items if i.name == "model.embed_tokens.weight")
    assert len(tasks_for(embed, run.chunk_elements)) > 5
    out = write_plan(plan, ckpts, OutputOptions(tmp_path / "out.safetensors"), run)
    want = mmerge.merge_tensors([load(fam["ft1"]), load(fam["ft2"])], method="slerp", **params)
    got = load(out)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], np.asarray(value), err_msg=name)
