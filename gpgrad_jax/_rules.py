"""Helpers shared by the solvers' ``custom_vjp`` rules."""

from __future__ import annotations

import jax


def unwrap_primals(tree):
    """``(tree of values, whether any leaf is perturbed)`` for an argument of a ``fwd`` rule
    registered with ``symbolic_zeros=True`` (its leaves are ``CustomVJPPrimal``)."""
    values = jax.tree_util.tree_map(lambda leaf: leaf.value, tree)
    return values, any(leaf.perturbed for leaf in jax.tree_util.tree_leaves(tree))
