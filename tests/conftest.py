"""Strict test configuration.

* Precision: float64 unless the environment says ``JAX_ENABLE_X64=0``.
* Profiles, chosen by ``GPGRAD_TESTS``:

  - ``fast`` (the default; the README's test command): 3 hypothesis examples per property (2 in
    float32),
    tests marked ``slow`` (the examples beyond the quick-start demo, the benchmark smoke tests,
    the four-device sharding run) deselected; the float32 pass takes only the tests marked
    ``float32`` — where float32 can break: closed form against autodiff, the filter's precision,
    conditioning errors, overflow.
  - ``full`` (``.ci/run`` runs it after the fast one): 12 examples per property, every test;
    ``.ci/run`` runs all of them in float64 and the ``float32`` ones in float32.

  ``HYPOTHESIS_PROFILE=thorough`` gives 200 examples per property in either.
* Hypothesis: deterministic (derandomised), no deadline (the first call of a shape compiles).
* The fast profile compiles with ``jax_disable_most_optimizations`` and XLA:CPU's older loop
  emitter (``--xla_cpu_use_fusion_emitters=false``): faster to compile, less optimised code; the
  full profile with XLA's defaults, as users compile. ``GPGRAD_XLA=fast`` or ``default`` overrides
  the profile's choice (``.ci/run`` runs the full float64 pass with the fast compiler, its float32
  pass — where XLA's rewrites could change a rounding — with the defaults).
* JAX's persistent compilation cache (in ``~/.cache/gpgrad_jax``) makes repeated runs faster.
"""

import gc
import os
import subprocess
import sys
from importlib.metadata import version

# Compiling is most of the fast profile's time and its programs are small. XLA:CPU's older
# loop emitter compiles them ~40 % faster than its MLIR fusion emitters (the programs of a
# Markov and a dense gradient, a prediction: 4.9–5.4 → 3.0–3.2 s); set before JAX starts its
# backend, which reads the flags once. The full profile compiles as users' programs are compiled.
# XLA aborts a process whose XLA_FLAGS name a flag it does not know: on a jaxlib other than the
# one measured, a child process tries the flag first (the xdist workers inherit the result).
if os.environ.setdefault("GPGRAD_XLA", "fast" if os.environ.get("GPGRAD_TESTS", "fast") == "fast" else "default") not in (
    "fast",
    "default",
):
    raise ValueError(f"GPGRAD_XLA must be 'fast' or 'default', got {os.environ['GPGRAD_XLA']!r}")
if os.environ["GPGRAD_XLA"] == "fast" and "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
    _flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_use_fusion_emitters=false".strip()
    if version("jaxlib").startswith("0.10.") or subprocess.run(
        [sys.executable, "-c", "import jax.numpy as jnp; jnp.zeros(1).block_until_ready()"],
        env=dict(os.environ, XLA_FLAGS=_flags, JAX_PLATFORMS="cpu"),
        capture_output=True,
        timeout=300,
    ).returncode == 0:
        os.environ["XLA_FLAGS"] = _flags

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
PROFILE = os.environ.get("GPGRAD_TESTS", "fast")
if PROFILE not in ("fast", "full"):
    raise ValueError(f"GPGRAD_TESTS must be 'fast' or 'full', got {PROFILE!r}")
# The fast float32 pass checks what the precision breaks, not the breadth of the properties.
settings.register_profile("fast", max_examples=3 if jax.config.jax_enable_x64 else 2, **_common)
settings.register_profile("ci", max_examples=12, **_common)
settings.register_profile("thorough", max_examples=200, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if PROFILE == "full" else "fast"))

# The fast profile also compiles without XLA's expensive backend optimisations (measured −20 %
# on test_markov + test_time_series, cold).
if os.environ["GPGRAD_XLA"] == "fast" and os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS") is None:
    jax.config.update("jax_disable_most_optimizations", True)

jax.config.update(
    "jax_compilation_cache_dir",
    os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "gpgrad_jax", "jax"),
)


def pytest_collection_modifyitems(config, items):
    if PROFILE == "full":
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


_MAPPINGS_BEFORE_RELEASE = 40_000  # of 65530; one test adds at most a few hundred


def _memory_mappings() -> int:
    try:
        with open("/proc/self/maps", "rb") as maps:
            return maps.read().count(b"\n")
    except OSError:  # not Linux: no such limit to watch
        return 0


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """Drop JAX's compiled programs after a test once the process holds many memory mappings.
    Each compiled program keeps a few mappings of machine code; a worker of the full profile
    compiles tens of thousands and crossed the kernel's limit of 65530 (``vm.max_map_count``) —
    a native crash, twice: at 62903 mappings measured just before, and again, inside one long
    module, when this was checked only between modules. Checked after every test (a few
    milliseconds), released only when needed: recompiling costs the fast profile time."""
    if _memory_mappings() > _MAPPINGS_BEFORE_RELEASE:
        jax.clear_caches()
        gc.collect()


@pytest.fixture(scope="session")
def x64() -> bool:
    return bool(jax.config.jax_enable_x64)


@pytest.fixture(scope="session")
def rtol(x64) -> float:
    """Relative tolerance for closed form vs autodiff on well-conditioned problems."""
    return 1e-9 if x64 else 2e-3


def pytest_report_header(config):
    return (
        f"jax {jax.__version__}, x64={jax.config.jax_enable_x64}, default float {jnp.zeros(()).dtype}, "
        f"profile {PROFILE} (GPGRAD_TESTS)"
    )
