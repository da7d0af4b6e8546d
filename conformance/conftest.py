"""The `backend` and `xp` fixtures: every test runs once per backend id, skipping (with the
reason) those not usable here, honouring MMERGE_BACKENDS and the skip_backend/xfail_backend
markers; array-api-strict runs without boolean indexing or data-dependent shapes."""

from __future__ import annotations

import pytest

from conformance.backends import BY_ID, selected


def _marked(request, name: str, backend_id: str) -> str | None:
    """The reason of a `name` marker on this test that lists `backend_id`, if any."""
    for mark in request.node.iter_markers(name):
        unknown = [i for i in mark.args if i not in BY_ID]
        if unknown:
            raise pytest.UsageError(f"{name} names unknown backend ids {unknown}")
        if not mark.kwargs.get("reason"):
            raise pytest.UsageError(f"{name}{mark.args} needs a written reason=...")
        if backend_id in mark.args:
            return mark.kwargs["reason"]
    return None


@pytest.fixture(params=[pytest.param(b, id=b.id) for b in selected()])
def backend(request):
    """A conformance.backends.Backend: put/host move arrays, xp is its namespace."""
    be = request.param
    ok, reason = be.available()
    if not ok:
        pytest.skip(f"backend unavailable here: {reason}")
    skip = _marked(request, "skip_backend", be.id)
    if skip:
        pytest.skip(skip)
    xfail = _marked(request, "xfail_backend", be.id)
    if xfail:
        request.applymarker(pytest.mark.xfail(reason=xfail, strict=False))
    with be.strictness():
        yield be


@pytest.fixture
def xp(backend):
    """The array namespace of the current backend."""
    return backend.xp
