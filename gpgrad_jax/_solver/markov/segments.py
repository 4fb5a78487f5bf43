r"""One series over many devices: the Markov recursions run in contiguous segments, one per device.

A recursion ``c_k = step(c_{k−1}, input_k)`` — the filter forward, the adjoints or the backward
information filter backward — whose steps also have *elements* that compose associatively
(the elements of ``"markov-parallel"``'s associative scans: the affine, conditional form of a
step) runs over ``S`` segments in three phases:

1. each segment composes its own elements (a sequential fold): one summary per segment,
   conditional on the unknown state entering it;
2. the ``S`` summaries — a few ``N × N`` matrices each — are gathered (the only communication
   besides each segment's neighbouring point) and composed in order: the true state entering
   every segment;
3. each segment reruns its recursion from that state, the same sequential scan as on one device.

The arrays keep their points axis split along the mesh axis (``jax.sharding``): every per-point
computation around the recursions is the one-device code, partitioned by XLA, with a point's
neighbour (``shift_forward``, ``shift_back``) exchanged at the segment boundaries. Phase 1 costs
about two sequential passes per recursion, so on one device this is slower than the plain scan;
across ``S`` devices each does ``n / S`` of the work.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

Array = Any


class Segments(NamedTuple):
    """The points split along ``axis`` (a name or a tuple of names) of ``mesh``, ``count``
    contiguous segments: one per device along the axis."""

    mesh: Any
    axis: Any
    count: int

    def along(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(self.axis))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())


def _constrain(tree, sharding):
    return jax.tree_util.tree_map(lambda a: jax.lax.with_sharding_constraint(a, sharding), tree)


def split(tree, segments: Segments):
    """``(n, …)`` arrays as ``(S, n / S, …)``: a leading axis of segments, one per device."""

    def one(a):
        return a.reshape(segments.count, a.shape[0] // segments.count, *a.shape[1:])

    return _constrain(jax.tree_util.tree_map(one, tree), segments.along())


def join(tree, segments: Segments):
    """The inverse of ``split``."""
    joined = jax.tree_util.tree_map(lambda a: a.reshape(a.shape[0] * a.shape[1], *a.shape[2:]), tree)
    return _constrain(joined, segments.along())


def _fold(elements, combine, reverse: bool):
    """One segment's composition of its elements (time order: ``combine(earlier, later)``)."""
    take = lambda a: a[-1] if reverse else a[0]  # noqa: E731
    rest = lambda a: a[:-1] if reverse else a[1:]  # noqa: E731
    first = jax.tree_util.tree_map(take, elements)

    def step(total, element):
        return (combine(element, total) if reverse else combine(total, element)), None

    total, _ = jax.lax.scan(step, first, jax.tree_util.tree_map(rest, elements), reverse=reverse)
    return total


def scan(run, inputs, elements, combine, entry, zero, segments: Segments, reverse: bool = False):
    """``run(inputs, init)`` — a recursion over one segment's points from ``init`` — over every
    segment, each from its true entry (module docstring).

    ``inputs`` and ``elements``: per-point pytrees (leading axis ``n``); ``combine(earlier,
    later)``: the element of two consecutive ranges, batched; ``entry(total)``: the recursion's
    carry after (``reverse``: before) a range with composition ``total``; ``zero``: the carry at
    the start (``reverse``: the end) of the series. Returns ``run``'s outputs, joined.
    """
    summaries = jax.vmap(lambda e: _fold(e, combine, reverse))(split(elements, segments))
    summaries = _constrain(summaries, segments.replicated())  # the small gather: S summaries
    if reverse:
        totals = jax.lax.associative_scan(lambda later, earlier: combine(earlier, later), summaries, reverse=True)
        entries = jax.vmap(entry)(jax.tree_util.tree_map(lambda a: a[1:], totals))
        entries = jax.tree_util.tree_map(lambda e, z: jnp.concatenate([e, z[None]]), entries, zero)
    else:
        totals = jax.lax.associative_scan(combine, summaries)
        entries = jax.vmap(entry)(jax.tree_util.tree_map(lambda a: a[:-1], totals))
        entries = jax.tree_util.tree_map(lambda e, z: jnp.concatenate([z[None], e]), entries, zero)
    entries = _constrain(entries, segments.along())
    return join(jax.vmap(run)(split(inputs, segments), entries), segments)


def associative_scan(combine, elements, segments: Segments, reverse: bool = False):
    """``jax.lax.associative_scan(combine, elements, reverse=reverse)`` over the split points:
    each segment scans its own, then takes in the composition of the segments before it
    (``reverse``: after it), gathered from one summary per segment."""
    local = jax.vmap(lambda e: jax.lax.associative_scan(combine, e, reverse=reverse))(split(elements, segments))
    summaries = _constrain(jax.tree_util.tree_map(lambda a: a[:, 0] if reverse else a[:, -1], local), segments.replicated())
    totals = jax.lax.associative_scan(combine, summaries, reverse=reverse)
    # The composition entering each segment; the first (reverse: last) has none: itself, unused.
    if reverse:
        carry = jax.tree_util.tree_map(lambda t: jnp.concatenate([t[1:], t[-1:]]), totals)
    else:
        carry = jax.tree_util.tree_map(lambda t: jnp.concatenate([t[:1], t[:-1]]), totals)
    carry = _constrain(carry, segments.along())
    length = jax.tree_util.tree_leaves(local)[0].shape[1]
    spread = jax.tree_util.tree_map(lambda c: jnp.broadcast_to(c[:, None], (c.shape[0], length, *c.shape[1:])), carry)
    combined = combine(spread, local)  # the scan direction's order: what comes before, then this
    edge = segments.count - 1 if reverse else 0
    first = (jnp.arange(segments.count) == edge).reshape(-1, 1)

    def pick(a, b):
        return jnp.where(first.reshape(first.shape + (1,) * (a.ndim - 2)), a, b)

    return join(jax.tree_util.tree_map(pick, local, combined), segments)


def segment_ends(n: int, segments: Segments):
    """``(n,)`` booleans: true at the last point of every segment but the last."""
    index = jnp.arange(n)
    length = n // segments.count
    return (index % length == length - 1) & (index < n - 1)
