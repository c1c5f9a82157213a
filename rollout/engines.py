"""The generation engines the trainer talks to, and how weights reach them (two halves:
`prepare` on the trainer's thread, before the next update donates the parameters; `load` on
the generating thread, between requests):
- `InProcessEngine`: the JAX generation engine (`rollout.generation`) in this process, on
  the trainer's mesh or on its own generation mesh (devices the trainer does not use);
  `prepare` casts the new parameters to the rollout dtype (`generator.model_dtype`) and
  moves them device to device onto the generation mesh's shardings, `load` swaps them in.
- `SidecarEngine`: rollout sidecars over HTTP (`rollout.server`, through `rollout.client`);
  `prepare` writes an orbax export in the rollout dtype, `load` pushes it to every sidecar.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from dapo_jax import multihost
from dapo_jax.placement import TOKEN_ENV
from rollout.generation import Generator, Sample, SamplingParams


class Engine(Protocol):
    def generate(self, prompts: list[list[int]], sampling: SamplingParams, n: int,
                 keys: list[int]) -> list[list[Sample]]: ...

    def prepare(self, graphdef: nnx.GraphDef, params: Any, step: int, version: int) -> Any:
        """The trainer's thread: the new weights in the form `load` takes, never an alias
        of `params` (the next update donates them, so nothing may read them later)."""

    def load(self, weights: Any, version: int) -> None:
        """The generating thread, between requests: serve `weights` as `version`."""


def _cast(params: Any, dtype: str) -> Any:
    """New buffers in `dtype`: a cast, or a copy where the dtype is already `dtype` (jit
    hands an input it returns unchanged straight back, the same buffer)."""
    return jax.tree.map(lambda x: x.astype(dtype) if x.dtype != dtype else jnp.copy(x),
                        params)


cast_params = jax.jit(_cast, static_argnames="dtype")


class InProcessEngine:
    """The JAX generation engine in this process, serving the weights in `dtype`. With a
    `mesh` other than the trainer's (a generation sub-mesh), the weights are copied device
    to device onto it, each leaf keeping its partition spec."""

    def __init__(self, graphdef: nnx.GraphDef, params: Any, dtype: str, *,
                 mesh: jax.sharding.Mesh | None, own_mesh: bool, **generator_kw: Any):
        self.dtype = dtype
        self.mesh = mesh
        self.own_mesh = own_mesh
        self._gather: Any = None
        self.generator = Generator(graphdef, self.prepare(graphdef, params, 0, 0), mesh=mesh,
                                   **generator_kw)

    def prepare(self, graphdef: nnx.GraphDef, params: Any, step: int, version: int) -> Any:
        del graphdef, step, version
        if self.own_mesh:  # device to device, no host round trip
            target = jax.tree.map(
                lambda x: jax.sharding.NamedSharding(self.mesh, x.sharding.spec), params)
            if jax.process_count() > 1:
                params = self._local_copy(params)  # already a new cast copy
            else:
                params = cast_params(params, dtype=self.dtype)
            return jax.device_put(params, target)
        # On the trainer's mesh: a cast, or a copy in the trainer's dtype, never the
        # trainer's own arrays (the next update donates those).
        return cast_params(params, dtype=self.dtype)

    def _local_copy(self, params: Any) -> Any:
        """A whole copy of the trainer's parameters (sharded over every process) on one of
        this process's devices, in the rollout dtype: the generation mesh holds this
        process's devices only, and an array moves between processes only inside a
        collective. One all-gather on the trainer's mesh (the trainer's thread), then this
        process's replica is used as is."""
        if self._gather is None:  # built once: the trainer's mesh does not change
            mesh = jax.tree.leaves(params)[0].sharding.mesh
            self._gather = jax.jit(functools.partial(_cast, dtype=self.dtype),
                                   out_shardings=jax.sharding.NamedSharding(
                                       mesh, jax.sharding.PartitionSpec()))
        return jax.tree.map(lambda x: x.addressable_data(0), self._gather(params))

    def load(self, weights: Any, version: int) -> None:
        self.generator.set_params(weights, version)

    def generate(self, prompts: list[list[int]], sampling: SamplingParams, n: int,
                 keys: list[int]) -> list[list[Sample]]:
        return self.generator.generate(prompts, sampling, n, keys)


class SidecarEngine:
    """Rollout sidecars over HTTP; weight sync is an orbax export in `dtype` pushed to each.
    A sidecar that does not answer is retried for `retry_window_s` (a launcher restarts a
    dead one within its start-up timeout).

    With several JAX processes, process 0 is the only client (split "primary"): it sends
    every prompt (spread over the sidecars as with one process) and the worker shares the
    samples with the others; every process writes its shards of the export (a filesystem
    all hosts and sidecars see), then process 0 pushes it."""

    def __init__(self, urls: list[str], token: str, export_dir: Path, dtype: str,
                 retry_window_s: float):
        from rollout.client import RolloutClient

        self.client = RolloutClient(urls, token=token or os.environ.get(TOKEN_ENV) or None,
                                    retry_window_s=retry_window_s)
        self.export_dir = export_dir
        self.dtype = dtype

    def generate(self, prompts: list[list[int]], sampling: SamplingParams, n: int,
                 keys: list[int]) -> list[list[Sample]]:
        return self.client.generate(prompts, sampling, n, keys)

    def prepare(self, graphdef: nnx.GraphDef, params: Any, step: int, version: int) -> Any:
        from dapo_jax.weight_export import export_weights

        path = export_weights(nnx.merge(graphdef, params), self.export_dir, step=step,
                              version=version, dtype=self.dtype)
        multihost.barrier(f"export_{step}")  # process 0 has renamed it into place
        return path

    def load(self, weights: Any, version: int) -> None:
        if multihost.is_primary():
            self.client.update_weights(str(weights), version)
