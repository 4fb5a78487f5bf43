"""Strict test configuration.

* Precision: float64 unless the environment says ``JAX_ENABLE_X64=0`` (the
  README's test command runs the suite both ways).
* Hypothesis: deterministic (derandomised), no deadline (the first call of a
  shape compiles), examples chosen by ``HYPOTHESIS_PROFILE`` (``ci`` default).
"""

import os

import jax

if os.environ.get("JAX_ENABLE_X64") is None:
    jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, settings

_common = dict(
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", max_examples=12, **_common)
settings.register_profile("thorough", max_examples=200, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def x64() -> bool:
    return bool(jax.config.jax_enable_x64)


@pytest.fixture(scope="session")
def rtol(x64) -> float:
    """Relative tolerance for closed form vs autodiff on well-conditioned problems."""
    return 1e-9 if x64 else 2e-3


def pytest_report_header(config):
    return f"jax {jax.__version__}, x64={jax.config.jax_enable_x64}, default float {jnp.zeros(()).dtype}"
