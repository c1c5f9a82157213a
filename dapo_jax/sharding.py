"""Device mesh and the one table that maps logical axis names to mesh axes.

Model code names the axes of every parameter and key activation with logical names
("embed", "heads", "batch", ...). `LOGICAL_RULES` is the only place that says which mesh
axis (`data`, `fsdp`, `tensor`) each logical axis is split over:

- FSDP shards parameters over the embedding dimension,
- tensor parallelism splits attention heads, the MLP hidden dimension and the vocabulary,
- the batch is split over `data` x `fsdp`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    # Activations keep their embedding dim whole: FSDP gathers weights, not activations.
    "act_embed": (),
    "length": (),
    "head_dim": (),
    "norm": (),
    "layers": (),
}


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills a single -1 entry so that the product equals `num_devices`.

    >>> resolve_mesh_shape((1, -1, 2), 8)
    (1, 4, 2)
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh.shape must have {len(MESH_AXES)} entries {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh.shape may contain at most one -1, got {shape}")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh.shape entries must be positive or -1, got {shape}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(
                f"mesh.shape {shape}: {num_devices} devices are not divisible by {known}"
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh.shape {shape} has {math.prod(shape)} devices but {num_devices} are available"
        )
    return shape


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `data` x `fsdp` x `tensor` mesh over all (or the given) devices.

    Axis types are Auto: XLA's partitioner decides the collectives, which is what the
    logical-rule constraints below expect (explicit axes reject sharded contractions).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(shape, len(devices))
    device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_context(mesh: Mesh | None) -> Any:
    """`jax.set_mesh(mesh)`, or nothing for single-device code (mesh None): calls traced
    inside it see the mesh, so the activation constraints below apply."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def logical_to_spec(
    logical_axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec through `LOGICAL_RULES`.

    With `shape` and `mesh`, a dimension that the mesh axes do not divide evenly is
    replicated instead (e.g. 2 KV heads on a tensor axis of 4); a mesh axis is used at most
    once per array.
    """
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in LOGICAL_RULES:
            raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_RULES")
        axes = tuple(a for a in LOGICAL_RULES[name] if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None and shape[i] % math.prod(mesh.shape[a] for a in axes):
                axes = ()
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def named_sharding(
    mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int]
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation, under the mesh set by `jax.set_mesh`.

    Without a mesh in context (single device, or code run outside `jax.set_mesh`) there is
    nothing to constrain and `x` is returned unchanged.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(logical_axes, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def batch_shards(rows: int) -> int:
    """How many ways `rows` batch rows are split over the mesh in context (1 without one, or
    when the batch axes do not divide them)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = logical_to_spec(("batch",), (rows,), mesh)[0]
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    return math.prod(mesh.shape[a] for a in axes)
