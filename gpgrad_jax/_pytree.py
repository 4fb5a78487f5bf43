"""Frozen dataclasses registered as pytrees: kernels, noise models and state-space blocks."""

from __future__ import annotations

import dataclasses

import jax


def pytree_dataclass(cls=None, *, static=()):
    """Make ``cls`` a frozen dataclass pytree: fields named in ``static`` are structure (part of
    the tree definition), all others are leaves — the parameters ``jax.grad`` and ``optax`` see.

    Registered with ``register_pytree_with_keys`` rather than ``register_dataclass``: in JAX
    0.10 the tree definitions of two ``register_dataclass`` classes with the same field names
    compare equal (``Matern32`` and ``Matern52``), and ``jit``'s cache then served one
    kernel's compiled state-space model for the other.
    """

    def wrap(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        data = tuple(n for n in names if n not in static)
        meta = tuple(n for n in names if n in static)

        def flatten_with_keys(obj):
            children = tuple((jax.tree_util.GetAttrKey(n), getattr(obj, n)) for n in data)
            return children, tuple(getattr(obj, n) for n in meta)

        def unflatten(aux, children):
            obj = object.__new__(cls)  # no __init__/__post_init__: leaves may be tracers or None
            for name, value in zip(data + meta, tuple(children) + tuple(aux)):
                object.__setattr__(obj, name, value)
            return obj

        flatten = lambda obj: (tuple(getattr(obj, n) for n in data), tuple(getattr(obj, n) for n in meta))  # noqa: E731
        jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
        return cls

    return wrap if cls is None else wrap(cls)
