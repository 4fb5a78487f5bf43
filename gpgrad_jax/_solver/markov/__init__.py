r"""The Markov (state-space) solvers: a Kalman filter and smoother, O(n).

For a kernel with a state-space form and block-diagonal noise, the likelihood is a linear-Gaussian
state-space model over the sorted scalar indices. The folder, one concept per module:

* ``blocks`` — the state-space blocks of the kernels (``blocks_of``, ``model_blocks``);
* ``model`` — the model of a problem: the blocks stacked, the points sorted, ``A_k``, ``Q_k``,
  ``C_k``, the whitened data;
* ``covariance`` and ``square_root`` — the two forms of the filter and smoother;
* ``forms`` — which form and which scan (``Scheme``), and the square-root form's derivatives;
* ``rule`` — the value and its closed-form ``custom_vjp``;
* ``posterior`` — marginals at new indices and draws;
* ``native`` — the sequential passes of both forms as C++ custom calls (``csrc/``);
* ``segments`` — one series over many devices: the recursions in contiguous segments;
* ``diagnostics`` — non-finite results and float32's rounding estimate.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gpgrad_jax._arguments import check_rule, poison
from gpgrad_jax._noise import BlockDiagonal
from gpgrad_jax._solver.base import Inapplicable, Solver, mesh_axis
from gpgrad_jax._solver.markov import diagnostics, native, posterior, rule
from gpgrad_jax._solver.markov.blocks import NoStateSpaceForm, model_blocks
from gpgrad_jax._solver.markov.forms import Scheme, default_square_root
from gpgrad_jax._solver.markov.model import pad_points
from gpgrad_jax._solver.markov.segments import Segments

Array = Any

FORMS = ("covariance", "square-root")


class Prepared(NamedTuple):
    """The problem and the state-space blocks of its kernel, built once per call."""

    kernel: Any
    noise: Any
    x: Array
    r: Array
    blocks: tuple


@dataclasses.dataclass(frozen=True)
class Markov(Solver):
    """The Kalman filter and smoother: O(n) time and memory, for scalar indices, a kernel with a
    state-space form and block-diagonal noise (``Isotropic``, ``PerPoint``).

    Args:
        form: ``"covariance"`` (covariances; exact and fastest in float64), ``"square-root"``
            (their factors, combined by QR; what float32 needs) or ``None`` — by the dtype:
            square roots below float64.
        parallel: associative scans of O(log n) depth (for GPUs) instead of sequential scans.
        native: run the sequential recursions (both forms) as native passes on the CPU (C++
            built at install, one custom call per pass); ``None`` (default): where built, else
            the JAX scans after a one-time warning; ``False``: the JAX scans (the reference).
            The associative scans, a mesh's segments and other platforms always run JAX.
        mesh: one series over many devices and hosts — a ``jax.sharding.Mesh``; the points,
            sorted, split along ``axis`` into contiguous segments, one per device: each device
            runs the recursions over its segment, conditional on the state entering it, a small
            gather of the segments' summaries gives every segment its true entry, and each reruns
            its segment from there (``segments.py``; the JAX scans, not the native passes). The
            value and every cotangent are the one-device ones; only neighbouring points and the
            summaries move between devices. ``x`` must come sorted (no global sort), ``n`` a
            multiple of the axis's size; ``predict`` and ``sample_posterior`` are not available.
        axis: the axis of ``mesh`` the series is split along (a name or a tuple of names;
            ``None`` for a mesh of one axis).

    Examples:
        >>> import jax.numpy as jnp
        >>> import gpgrad_jax as gg
        >>> from gpgrad_jax import kernels, noise
        >>> x = jnp.linspace(0.0, 5.0, 50)
        >>> solver = gg.solvers.Markov(form="square-root")
        >>> a = gg.log_marginal_likelihood(kernels.Matern32(1.0, 1.0), x, jnp.sin(x), noise.Isotropic(0.1), solver=solver)
        >>> b = gg.log_marginal_likelihood(kernels.Matern32(1.0, 1.0), x, jnp.sin(x), noise.Isotropic(0.1), solver="dense")
        >>> bool(jnp.allclose(a, b))
        True
    """

    form: str | None = None
    parallel: bool = False
    native: bool | None = None
    mesh: Any = None
    axis: Any = None

    def __post_init__(self):
        if self.form not in (None, *FORMS):
            raise ValueError(f"`form` must be None, 'covariance' or 'square-root', got {self.form!r}")
        if not isinstance(self.parallel, bool):
            raise TypeError(f"`parallel` must be a bool, got {self.parallel!r}")
        if self.native is not None and not isinstance(self.native, bool):
            raise TypeError(f"`native` must be None or a bool, got {self.native!r}")
        if self.native and not native.available():
            raise ValueError(f"`native=True`: {native.MISSING}")
        self._segments()  # the mesh and axis, checked now

    def _segments(self) -> Segments | None:
        checked = mesh_axis(self.mesh, self.axis, "the series is")
        if checked is None:
            return None
        if self.parallel:
            raise ValueError("`parallel=True` with a `mesh`: over a mesh the segments run sequential scans; drop one")
        return Segments(self.mesh, *checked)

    @property
    def name(self) -> str:
        return "markov-parallel" if self.parallel else "markov"

    def scheme(self, dtype) -> Scheme:
        """The scheme the solver runs in ``dtype``."""
        square_root = default_square_root(dtype) if self.form is None else self.form == "square-root"
        parts = self._segments()
        runs_native = (
            self.native is not False and not self.parallel and parts is None and native.applies(dtype)
        )
        return Scheme(square_root=square_root, parallel=self.parallel, native=runs_native, segments=parts)

    def prepare(self, problem) -> Prepared:
        kernel, noise, x, r = problem
        if x.ndim != 1:
            raise Inapplicable(f"they need scalar indices, `x` has shape {x.shape}")
        if not isinstance(noise, BlockDiagonal):
            raise Inapplicable(
                f"noise.{type(noise).__name__} is not block diagonal per point (use Isotropic or PerPoint noise)"
            )
        try:
            blocks = model_blocks(kernel)
        except NoStateSpaceForm as err:
            raise Inapplicable(str(err)) from err
        parts = self._segments()
        if parts is not None:
            if x.shape[0] % parts.count:
                raise ValueError(
                    f"`x`: over a mesh the series is split into {parts.count} equal segments (the size of "
                    f"axis {parts.axis!r}), and n = {x.shape[0]} points do not divide; pad the series or "
                    "drop points to a multiple"
                )

            def ascending(v):
                if isinstance(v, np.ndarray):
                    return np.concatenate([np.ones(1, bool), v[1:] >= v[:-1]])
                return ~pad_points(v[1:] < v[:-1], 1, 0)

            requirement = "sorted (non-decreasing) over a mesh: the series is split into contiguous segments"
            (x,) = poison(check_rule("x", x, ascending, requirement), x)
        return Prepared(kernel, noise, x, r, blocks)

    def log_likelihood(self, prepared):
        return rule.log_marginal_likelihood(self.scheme(prepared.r.dtype), *self._args(prepared))

    def plain_log_likelihood(self, prepared):
        return rule._forward(self.scheme(prepared.r.dtype), *self._args(prepared))[0]

    def index_gradient(self, prepared):
        return rule.index_gradient(self.scheme(prepared.r.dtype), *self._args(prepared))

    def _no_posterior(self):
        if self.mesh is not None:
            raise NotImplementedError(
                "predict and sample_posterior with a Markov solver over a `mesh` are not available yet: "
                "the new indices would have to be merged into the split series; use the solver without "
                "the mesh (on one device) for the posterior"
            )

    def predict(self, prepared, x_new):
        self._no_posterior()
        scheme = self.scheme(prepared.r.dtype)
        mean, cov = posterior.posterior_marginals(scheme, *self._args(prepared), x_new)
        n_new, p, q = mean.shape
        variance = jnp.broadcast_to(jnp.diagonal(cov, axis1=-2, axis2=-1)[..., None], (n_new, p, q))
        return mean.reshape(n_new, p * q), variance.reshape(n_new, p * q)

    def rounding_estimate(self, prepared):
        scheme = self.scheme(prepared.r.dtype)
        eps = float(jnp.finfo(prepared.r.dtype).eps)
        if not scheme.square_root or eps * 1e6 < diagnostics.PRECISION_WARNING_LEVEL:
            return None, None  # the covariance form has no estimate; float64's is never near the level
        spread = rule._forward(scheme, *self._args(prepared))[1][1].spread
        return eps * jnp.max(spread), diagnostics.PRECISION_WARNING_LEVEL

    def predict_covariance(self, prepared, x_new):
        self._no_posterior()
        return super().predict_covariance(prepared, x_new)

    def sample(self, key, prepared, x_new, num_samples):
        self._no_posterior()
        return posterior.posterior_draws(self.parallel, key, *self._args(prepared), num_samples, x_new)

    @staticmethod
    def _args(prepared):
        return prepared.blocks, prepared.noise, prepared.x, prepared.r


def default_for_backend() -> Markov:
    """The Markov solver ``"auto"`` takes: the parallel one on an accelerator."""
    return Markov(parallel=jax.default_backend() != "cpu")
