"""Hypothesis profiles: 'ci' (derandomized, few examples: the whole suite in a few minutes on
two cores) and 'long' (many random examples); MMERGE_HYPOTHESIS_PROFILE picks one.

Tests apply the chosen profile with the `PROFILE` decorator rather than loading it globally,
so other test suites in the same pytest session keep their own Hypothesis settings.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_QUIET = [
    HealthCheck.function_scoped_fixture,  # the backend fixture holds no per-example state
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
]

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=20,
    deadline=None,
    database=None,
    suppress_health_check=_QUIET,
    print_blob=True,
)
settings.register_profile(
    "long",
    max_examples=200,
    deadline=None,
    suppress_health_check=_QUIET,
    print_blob=True,
)

NAME = os.environ.get("MMERGE_HYPOTHESIS_PROFILE", "ci")
PROFILE = settings.get_profile(NAME)
