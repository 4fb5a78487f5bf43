r"""State-space forms: give your own kernel the O(n) solvers, with exact gradients.

The Markov solvers (``solver="markov"``, ``"markov-parallel"``, ``gg.solvers.Markov``) run a Kalman
filter over the sorted indices. A kernel takes them when it has a *state-space form*: a linear SDE
$ds = F s\,dt + L\,dW$ whose state $s$ (``size`` entries) reads the process as $f = H s$ — one
*block*, or a tuple of them stacked (``f`` the sum of their read-outs).
[``of``][gpgrad_jax.state_space.of] gives the blocks of a kernel;
[``register``][gpgrad_jax.state_space.register] adds a form for a kernel class of your own.

**The contract of a block** ([``Block``][gpgrad_jax.state_space.Block]; batched over leading axes
of ``h`` and ``t``):

* ``transition(h)`` — $A(h) = e^{F h}$;
* ``process_noise(h)`` — $Q(h) = \int_0^h e^{F\tau} L Q_c L^\top e^{F^\top\tau} d\tau$, for a
  stationary block $P_\infty - A(h) P_\infty A(h)^\top$;
* ``stationary_covariance()`` — $P_\infty$ (subclass
  [``StationaryBlock``][gpgrad_jax.state_space.StationaryBlock]; a method named ``stationary()``, the
  earlier contract, is still read), **or** ``initial(t)`` — the prior covariance of the state at the
  smallest index $t$;
* ``observation()`` — $H$; by default (``None``) the first entry;
* optionally ``process_noise_factor(h)``, ``initial_factor(t)`` (square roots for the float32
  solvers; Cholesky factors by default) and ``slope_entry`` (where $f'$ sits, for blocks with
  differentiable paths: a faster identity for the index gradient).

All of them must be JAX functions of the block's fields. **The gradient is then exact and in
closed form**: the smoother gives the cotangents $\bar A_k$, $\bar Q_k$ of every step and of the
first state's prior (``docs/math.md``, section 4b), and autodiff of your small per-step
functions, vectorised over the steps, maps them to your parameters (one ``jax.vjp``) and to the
steps $h_k$ — hence to the indices (one ``jax.jvp``). Autodiff never runs through the filter.
Kernels with a kink at $\tau = 0$ (paths that are not differentiable, as for Matérn 1/2) are
handled: where indices tie, the gradient is the mean of the one-sided derivatives, as the dense
solver's.

Sums of kernels stack their blocks, ``c * k`` scales them and products of stationary blocks
become product blocks, so a registered kernel composes with the built-in ones.

Examples:
    >>> import jax.numpy as jnp
    >>> import gpgrad_jax as gg
    >>> from gpgrad_jax import kernels, state_space
    >>> @kernels.register
    ... class OrnsteinUhlenbeck(kernels.Kernel):  # Matérn 1/2, written by hand
    ...     variance: jnp.ndarray
    ...     rate: jnp.ndarray
    ...     scalar_index_only = True
    ...
    ...     def evaluate(self, a, b):
    ...         return self.variance * jnp.exp(-self.rate * jnp.abs(a - b))
    ...
    ...     def grad_first(self, a, b):  # 0 at a == b: the mean of the one-sided derivatives
    ...         return -self.rate * jnp.sign(a - b) * self.evaluate(a, b)
    >>> @state_space.block
    ... class OUBlock(state_space.StationaryBlock):
    ...     variance: jnp.ndarray
    ...     rate: jnp.ndarray
    ...     size = 1
    ...
    ...     def transition(self, h):
    ...         return jnp.exp(-self.rate * h)[..., None, None]
    ...
    ...     def process_noise(self, h):
    ...         return -self.variance * jnp.expm1(-2.0 * self.rate * h)[..., None, None]
    ...
    ...     def stationary_covariance(self):
    ...         return jnp.reshape(self.variance, (1, 1))
    >>> @state_space.register
    ... def _(kernel: OrnsteinUhlenbeck):
    ...     return (OUBlock(kernel.variance, kernel.rate),)
    >>> k = OrnsteinUhlenbeck(1.0, 2.0)
    >>> x, y = jnp.array([0.3, 0.1, 0.7, 0.4]), jnp.array([0.2, -0.1, 0.5, 0.3])
    >>> markov = gg.log_marginal_likelihood(k, x, y, gg.noise.Isotropic(0.3), solver="markov")
    >>> dense = gg.log_marginal_likelihood(k, x, y, gg.noise.Isotropic(0.3), solver="dense")
    >>> bool(jnp.allclose(markov, dense))
    True
"""

from __future__ import annotations

from gpgrad_jax._pytree import pytree_dataclass
from gpgrad_jax._solver.markov.blocks import Block, NoStateSpaceForm, StationaryBlock, blocks_of, model_blocks

__all__ = ["Block", "Component", "NoStateSpaceForm", "Stationary", "StationaryBlock", "block", "component", "of", "register"]

#: The earlier names of ``Block`` and ``StationaryBlock`` (and of the ``block`` decorator), kept so
#: that blocks written against them still work.
Component = Block
Stationary = StationaryBlock


def of(kernel) -> tuple:
    """The state-space blocks of ``kernel``, each reading ``f`` as its first state entry.

    Raises [``NoStateSpaceForm``][gpgrad_jax.state_space.NoStateSpaceForm] naming the kernel
    when it has none (the squared exponential; products with the curve kernels).

    Examples:
        >>> from gpgrad_jax import kernels, state_space
        >>> k = kernels.Matern32(1.0, 2.0) * kernels.Cosine(1.0, 1.0) + kernels.Matern12(0.5, 0.1)
        >>> [(type(b).__name__, b.size) for b in state_space.of(k)]
        [('ProductBlock', 4), ('Matern12Block', 1)]
    """
    return model_blocks(kernel)


def register(kernel_class_or_function, function=None):
    """Register the state-space form of a kernel class: decorate a function of one argument
    annotated with the class, returning a tuple of blocks ([``Block``][gpgrad_jax.state_space.Block]
    instances), or call ``register(KernelClass, function)``. See the module's example."""
    if function is None:
        return blocks_of.register(kernel_class_or_function)
    return blocks_of.register(kernel_class_or_function, function)


def block(cls):
    """Declare a state-space block class: a frozen dataclass pytree (its annotated fields are
    its parameters), which must subclass [``Block``][gpgrad_jax.state_space.Block]
    (or [``StationaryBlock``][gpgrad_jax.state_space.StationaryBlock])."""
    if not (isinstance(cls, type) and issubclass(cls, Block)):
        raise TypeError(f"state_space.block takes a subclass of gpgrad_jax.state_space.Block, got {cls!r}")
    return pytree_dataclass(cls)


component = block
