"""The method registry's contents, the errors every call shares, and 16-bit inputs."""

import ml_dtypes
import numpy as np
import pytest
from helpers import BACKENDS, grid, to_backend, to_numpy

import mmerge.methods as M
from mmerge.errors import InvalidInput, UnknownMethod

RNG = np.random.default_rng(0)
BASE = grid(RNG, (6, 8))
A, B = BASE + grid(RNG, (6, 8), 0.2), BASE + grid(RNG, (6, 8), 0.2)


def test_every_module_registers_its_methods_and_they_are_attributes():
    """Adding a module to mmerge.methods is all it takes: each is imported and registered."""
    import pkgutil

    names = [spec.name for spec in M.all_methods()]
    assert len(names) == len(set(names)) and names
    for name in names:
        assert M.get(name) is getattr(M, name)
        assert name in M.__all__
    modules = {m.name for m in pkgutil.iter_modules(M.__path__) if not m.name.startswith("_")}
    homes = {spec.apply.__module__.rsplit(".", 1)[1] for spec in M.all_methods()}
    assert homes <= modules


@pytest.mark.parametrize("spec", M.all_methods(), ids=lambda s: s.name)
def test_registry_entries_are_complete(spec):
    assert spec.description and spec.reference
    assert spec.min_models >= 1
    assert spec.max_models is None or spec.max_models >= spec.min_models
    for p in spec.params:
        assert p.help
        assert p.check(p.default, spec.name) == p.default  # defaults lie in their own range


def test_mergekit_defaults():
    def default(method, name):
        return M.get(method).param(name).default

    assert default("ties", "normalize") is True
    assert default("dare_ties", "normalize") is False
    assert default("della", "normalize") is True
    assert default("task_arithmetic", "normalize") is False
    assert default("linear", "normalize") is True
    assert default("dare_linear", "rescale") == "l1"
    assert default("della", "rescale") == "l1"
    assert default("ties", "rescale") == "none"
    assert default("ties", "election") == "weighted_sum"
    assert default("breadcrumbs", "gamma") == 0.01
    assert default("della", "epsilon") == 0.15
    assert default("slerp", "dot_threshold") == 0.9995
    assert default("slerp", "magnitude") == "shoemake"
    assert default("sce", "select_topk") == 1.0
    assert M.get("nuslerp").param("nuslerp_flatten").default is True
    for name in ("weight", "density", "gamma", "epsilon"):
        assert all(p.per_model for s in M.all_methods() for p in s.params if p.name == name)


@pytest.mark.parametrize("spec", M.all_methods(), ids=lambda s: s.name)
def test_base_rule_is_enforced(spec):
    """What the registry declares about a base is what a call enforces."""
    models = [A, B][: max(1, min(2, spec.max_models or 2))]
    if spec.base == "required":
        with pytest.raises(InvalidInput, match="needs a base model"):
            spec(models)
    if spec.base == "none":
        with pytest.raises(InvalidInput, match="does not use a base model"):
            spec(models, base=BASE)


@pytest.mark.parametrize("spec", M.all_methods(), ids=lambda s: s.name)
def test_random_methods_take_a_seed(spec):
    assert spec.random == any(p.name == "seed" for p in spec.params)


def test_unknown_method_suggests():
    with pytest.raises(UnknownMethod, match="did you mean 'ties'"):
        M.get("tiess")


def test_unknown_parameter():
    with pytest.raises(InvalidInput, match="unknown parameter 'desnity'"):
        M.ties([A], base=BASE, desnity=0.5)


def test_mismatched_shapes():
    with pytest.raises(InvalidInput, match="mismatched shapes"):
        M.linear([A, B[:, :4]])


def test_base_with_another_shape():
    with pytest.raises(InvalidInput, match="mismatched shapes"):
        M.ties([A, B], base=BASE[:3])


@pytest.mark.parametrize("t", [-0.1, 1.5])
def test_t_outside_0_1(t):
    with pytest.raises(InvalidInput, match=r"'t' must be in \[0, 1\]"):
        M.slerp([A, B], t=t)


def test_mixed_libraries():
    torch = pytest.importorskip("torch")
    with pytest.raises(InvalidInput, match="mixed array libraries"):
        M.linear([A, torch.from_numpy(B)])
    with pytest.raises(InvalidInput, match="mixed array libraries"):
        M.ties([torch.from_numpy(A)], base=BASE)


def test_wrong_number_of_models():
    with pytest.raises(InvalidInput, match="at most 2"):
        M.slerp([A, B, A])
    with pytest.raises(InvalidInput, match="at least 2"):
        M.slerp([A])
    with pytest.raises(InvalidInput, match="or 1 and a base"):
        M.slerp([A, B], base=BASE)
    with pytest.raises(InvalidInput, match="at least 2"):
        M.nuslerp([A])
    with pytest.raises(InvalidInput, match="at most 1"):
        M.passthrough([A, B])
    with pytest.raises(InvalidInput, match="at least 2"):
        M.model_stock([A], base=BASE)
    with pytest.raises(InvalidInput, match="at least 1"):
        M.linear([])


@pytest.mark.parametrize(
    "call",
    [
        lambda: M.ties([A], base=BASE, election="majority"),
        lambda: M.dare_ties([A], base=BASE, rescale="l2"),
        lambda: M.slerp([A, B], magnitude="lerp"),
        lambda: M.nearswap([A, B], t=0.0),
        lambda: M.dare_ties([A], base=BASE, seed=-1),
        lambda: M.breadcrumbs([A], base=BASE, gamma=1.0),
        lambda: M.karcher([A, B], max_iter=0),
        lambda: M.ties([A], base=BASE, normalize="maybe"),
    ],
    ids=["election", "rescale", "magnitude", "nearswap-t", "seed", "gamma", "max_iter", "bool"],
)
def test_parameter_out_of_range(call):
    with pytest.raises(InvalidInput):
        call()


def test_integer_tensors_are_refused():
    with pytest.raises(InvalidInput, match="floating-point"):
        M.linear([np.arange(3), np.arange(3)])


# --- 16-bit inputs: computed in float32, rounded once ---------------------------------------


def _bf16(a):
    return a.astype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("name", ["linear", "ties", "dare_ties", "slerp", "della"])
def test_numpy_bfloat16_round_trip(name):
    spec = M.get(name)
    kw = {"density": 0.5} if "density" in {p.name for p in spec.params} else {}
    base = BASE if spec.needs_base else None
    wide = [_bf16(x).astype(np.float32) for x in (A, B)]
    wide_base = None if base is None else _bf16(base).astype(np.float32)
    out = spec(
        [_bf16(A), _bf16(B)], base=None if base is None else _bf16(base), tensor_name="w", **kw
    )
    assert out.dtype == ml_dtypes.bfloat16
    want = _bf16(spec(wide, base=wide_base, tensor_name="w", **kw))
    assert np.array_equal(out.astype(np.float32), want.astype(np.float32))


@pytest.mark.parametrize("be", [p for p in BACKENDS if p.values[0] in ("torch", "mlx")])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_backend_16_bit_round_trip(be, dtype):
    cast = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    models = [A.astype(cast).astype(np.float32), B.astype(cast).astype(np.float32)]
    base = BASE.astype(cast).astype(np.float32)

    def narrow(a):
        x = to_backend(be, a)
        if be == "torch":
            import torch

            return x.to(getattr(torch, dtype))
        import mlx.core as mx

        return x.astype(getattr(mx, dtype))

    out = M.dare_ties([narrow(m) for m in models], base=narrow(base), density=0.5, tensor_name="w")
    assert str(out.dtype).endswith(dtype)
    want = M.dare_ties(models, base=base, density=0.5, tensor_name="w").astype(cast)
    assert np.array_equal(to_numpy(out).astype(np.float32), want.astype(np.float32))
