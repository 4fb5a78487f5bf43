"""Frozen dataclasses registered as pytrees: kernels, noise models and state-space blocks."""

from __future__ import annotations

import dataclasses

import jax


def pytree_dataclass(cls=None, *, static=()):
    """Make ``cls`` a frozen dataclass pytree: fields named in ``static`` are structure (part of
    the tree definition), all others are leaves — the parameters ``jax.grad`` and ``optax`` see."""

    def wrap(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        return jax.tree_util.register_dataclass(
            cls, data_fields=[n for n in names if n not in static], meta_fields=list(static)
        )

    return wrap if cls is None else wrap(cls)
