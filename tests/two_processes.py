"""One process of the two-process check (``test_distributed.py::test_two_processes``).

    python tests/two_processes.py PROCESS_ID PORT

Joins a two-process JAX cluster on localhost (``jax.distributed``, CPU collectives over gloo),
holds half of each problem's points, evaluates the value and every cotangent of the inducing
bound and of both forms of the Markov solver over the cluster's mesh, and prints one JSON line:
the largest relative difference from the same call on this process alone, per problem.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np


def _relative(cluster, alone) -> float:
    """The largest difference between a result on the cluster and on one device, relative to the
    largest entry of each leaf, over what this process holds."""
    worst = 0.0
    for a, b in zip(jax.tree_util.tree_leaves(cluster), jax.tree_util.tree_leaves(alone)):
        b = np.asarray(b)
        scale = max(float(np.max(np.abs(b))), 1e-300)
        for shard in a.addressable_shards:
            worst = max(worst, float(np.max(np.abs(np.asarray(shard.data) - b[shard.index]))) / scale)
    return worst


def main(process_id: int, port: int) -> None:
    # Here, not at import: pytest imports every module under tests/ for its doctests.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_x64", True)
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    from jax.sharding import NamedSharding, PartitionSpec

    import gpgrad_jax as gg

    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("points",))
    along = NamedSharding(mesh, PartitionSpec("points"))
    rng = np.random.default_rng(0)  # the same problems in both processes; each keeps its half
    n, dim = 40, 3
    half = slice(process_id * n // 2, (process_id + 1) * n // 2)

    def global_array(a):
        return jax.make_array_from_process_local_data(along, np.asarray(a)[half], np.shape(a))

    blocks = rng.normal(size=(n, dim, dim))
    blocks[::3, 2] = 0.0  # rank-deficient blocks, as a point one camera sees
    y = rng.normal(size=(n, dim))
    report = {}

    # The inducing bound: a GPLVM's 2-D latent positions, m = 6.
    latent = rng.normal(size=(n, 2))
    z = rng.normal(size=(6, 2))
    kernel = gg.kernels.ExpSquared(1.3, 0.8)

    def bound(k, x, y, nz, z, **mesh_args):
        return gg.inducing_bound(k, x, y, nz, z, **mesh_args)

    args = (kernel, latent, y, gg.noise.PerPoint(blocks), z)
    alone = jax.jit(jax.value_and_grad(bound, argnums=(0, 1, 2, 3, 4)))(*args)
    cluster_args = (kernel, global_array(latent), global_array(y), gg.noise.PerPoint(global_array(blocks)), z)
    on_mesh = jax.jit(jax.value_and_grad(lambda *a: bound(*a, mesh=mesh, axis="points"), argnums=(0, 1, 2, 3, 4)))
    report["inducing"] = _relative(on_mesh(*cluster_args), alone)

    # The Markov path: a sorted series with a tie, Matérn 3/2 × Cosine + Matérn 1/2.
    x = np.sort(rng.uniform(0.0, 10.0, n))
    x[7] = x[6]
    kernel = gg.kernels.Matern32(1.0, 2.0) * gg.kernels.Cosine(1.0, 1.5) + gg.kernels.Matern12(0.5, 0.7)
    for form in ("covariance", "square-root"):
        one = gg.solvers.Markov(form=form)
        many = gg.solvers.Markov(form=form, mesh=mesh, axis="points")

        def density(k, x, y, nz, solver):
            return gg.log_marginal_likelihood(k, x, y, nz, solver=solver)

        grad = jax.value_and_grad(density, argnums=(0, 1, 2, 3))
        alone = jax.jit(grad, static_argnums=4)(kernel, x, y, gg.noise.PerPoint(blocks), one)
        cluster = jax.jit(grad, static_argnums=4)(
            kernel, global_array(x), global_array(y), gg.noise.PerPoint(global_array(blocks)), many
        )
        report[f"markov-{form}"] = _relative(cluster, alone)
    print(json.dumps({"process": process_id, "devices": jax.device_count(), **report}), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
