"""Running a registered method on a backend from host inputs, and drawing whole calls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import currently_in_test_context, reject
from hypothesis import strategies as st

from conformance.backends import Backend
from conformance.cases import CASES, TENSOR_NAME
from conformance.strategies import RELATIONS, Inputs, inputs, params
from mmerge.errors import InvalidInput
from mmerge.methods import get


@dataclass
class Call:
    """One drawn merge: a method name, host inputs and parameters."""

    name: str
    inputs: Inputs
    params: dict[str, Any]
    tensor_name: str = TENSOR_NAME

    def __repr__(self) -> str:  # what Hypothesis prints for a failing example
        shapes = [tuple(m.shape) for m in self.inputs.models]
        base = "with base" if self.inputs.base is not None else "no base"
        return (
            f"Call({self.name}, {len(shapes)} models {shapes[0]} {self.inputs.dtype} {base}, "
            f"relation={self.inputs.relation}, params={self.params})"
        )


def merge(backend: Backend, call: Call) -> Any:
    """The method's result on `backend` (a backend array), from the call's host inputs.

    A refusal the spec allows for these inputs (Case.refusals) discards the example.
    """
    if not backend.subnormals and currently_in_test_context() and _float32_subnormals(call):
        reject()  # a drawn call the backend's kernels change (flushing), not the method
    spec = get(call.name)
    models = [backend.put(m) for m in call.inputs.models]
    base = None if call.inputs.base is None else backend.put(call.inputs.base)
    try:
        return spec(models, base=base, tensor_name=call.tensor_name, **call.params)
    except InvalidInput as exc:
        reject_if_allowed(call.name, exc)
        raise


def _float32_subnormals(call: Call) -> bool:
    """Whether a float32 input, or a float parameter, is non-zero and below float32's smallest
    normal number."""
    tiny = float(np.finfo(np.float32).tiny)
    arrays = [*call.inputs.models, *([] if call.inputs.base is None else [call.inputs.base])]
    if any(a.dtype == np.float32 and bool(np.any((a != 0) & (np.abs(a) < tiny))) for a in arrays):
        return True
    values = [v for p in call.params.values() for v in (p if isinstance(p, list) else [p])]
    return any(isinstance(v, float) and 0 < abs(v) < tiny for v in values)


def reject_if_allowed(name: str, exc: InvalidInput) -> None:
    """Discard the current Hypothesis example when `exc` is a refusal the spec allows."""
    if any(text in str(exc) for text in CASES[name].refusals):
        reject()


def merge_on_host(backend: Backend, call: Call):
    """`merge`, with the result moved back to the host."""
    return backend.host(merge(backend, call))


@st.composite
def calls(
    draw,
    name: str,
    dtypes: tuple[str, ...],
    *,
    relations: tuple[str, ...] = RELATIONS,
    fixed: dict[str, Any] | None = None,
    shapes=None,
) -> Call:
    """A valid call of method `name` in one of `dtypes`; `fixed` parameters override."""
    case = CASES[name]
    n, with_base = draw(st.sampled_from(case.counts))
    drawn = draw(inputs(dtypes, n, with_base, shapes=shapes, relations=relations))
    chosen = draw(params(get(name), n, case.overrides(n)))
    chosen.update(fixed or {})
    return Call(name, drawn, chosen)
