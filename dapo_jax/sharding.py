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
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

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


@dataclasses.dataclass(frozen=True)
class Replicated:
    """A dimension that its rule would split but the mesh does not divide, so it is kept
    whole on every device: `size` is not divisible by the product of `mesh_axes`."""

    dim: int
    logical: str
    size: int
    mesh_axes: tuple[str, ...]
    ways: int

    def describe(self) -> str:
        return (f"{self.logical} {self.size} (dim {self.dim}) is not divisible by "
                f"{' x '.join(self.mesh_axes)} = {self.ways}")


def spec_and_replicated(
    logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
    mesh: Mesh | AbstractMesh | None = None,
) -> tuple[PartitionSpec, list[Replicated]]:
    """`LOGICAL_RULES` applied to one array: its PartitionSpec and the dimensions the rules
    would split but the mesh does not divide (kept whole, e.g. 4 KV heads on a tensor axis
    of 8). Mesh axes of size 1 are left out, and a mesh axis is used at most once per
    array."""
    used: set[str] = set()
    spec: list[Any] = []
    dropped: list[Replicated] = []
    for i, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in LOGICAL_RULES:
            raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_RULES")
        axes = tuple(a for a in LOGICAL_RULES[name] if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            ways = math.prod(mesh.shape[a] for a in axes)
            if shape is not None and shape[i] % ways:
                dropped.append(Replicated(i, name, int(shape[i]), axes, ways))
                axes = ()
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec), dropped


def logical_to_spec(
    logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
    mesh: Mesh | AbstractMesh | None = None,
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec through `LOGICAL_RULES`.

    With `shape` and `mesh`, a dimension that the mesh axes do not divide evenly is
    replicated instead (`spec_and_replicated` says which; parameters are checked by
    `replicated_parameters`); a mesh axis is used at most once per array.
    """
    return spec_and_replicated(logical_axes, shape, mesh)[0]


def batch_spec() -> PartitionSpec:
    """The rows of a batch: split over the "batch" rule's mesh axes."""
    return logical_to_spec(("batch",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """`batch_spec` on `mesh`: what every [N, ...] batch array the trainer and the engine
    put on the devices is split by."""
    return NamedSharding(mesh, batch_spec())


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


@dataclasses.dataclass(frozen=True)
class ParamLayout:
    """One parameter on a mesh: its path ("layers.attn.q_proj"), global shape and dtype,
    the PartitionSpec its logical axes give, and the dimensions its rule would split but
    the mesh keeps whole."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    spec: PartitionSpec
    replicated: tuple[Replicated, ...]

    def bytes_per_device(self, mesh: Mesh | AbstractMesh) -> int:
        """Bytes of one device's shard (the largest, were a dimension split unevenly)."""
        shard = list(self.shape)
        for i, axes in enumerate(self.spec):
            axes = (axes,) if isinstance(axes, str) else (axes or ())
            shard[i] = -(-shard[i] // math.prod(mesh.shape[a] for a in axes))
        return math.prod(shard) * np.dtype(self.dtype).itemsize

    def warning(self, mesh: Mesh | AbstractMesh) -> str:
        why = "; ".join(r.describe() for r in self.replicated)
        return (f"{self.path} {list(self.shape)} is replicated against its rule on mesh "
                f"{mesh_label(mesh)} ({self.bytes_per_device(mesh) / 2**30:.2f} GiB on every "
                f"device): {why}")


def mesh_label(mesh: Mesh | AbstractMesh) -> str:
    """"data=1 fsdp=1 tensor=8"."""
    return " ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES)


def param_layout(path: str, logical_axes: Sequence[str | None], shape: Sequence[int],
                 dtype: Any, mesh: Mesh | AbstractMesh) -> ParamLayout:
    spec, replicated = spec_and_replicated(logical_axes, shape, mesh)
    return ParamLayout(path, tuple(int(s) for s in shape), np.dtype(dtype).name, spec,
                       tuple(replicated))


class ReplicatedParameters(ValueError):
    pass


def check_replication(layouts: Sequence[ParamLayout], mesh: Mesh | AbstractMesh, *,
                      strict: bool, warn: Any = None) -> list[str]:
    """The parameters the mesh replicates against their rule, one line each, passed to
    `warn` (e.g. print to stderr); with `strict`, a ReplicatedParameters error naming them
    all instead. A mesh that splits a model's heads or vocabulary must say so: silently
    replicated weights cost memory and the tensor parallelism asked for."""
    lines = [p.warning(mesh) for p in layouts if p.replicated]
    if lines and strict:
        names = ", ".join(p.path for p in layouts if p.replicated)
        raise ReplicatedParameters(
            f"mesh {mesh_label(mesh)} replicates {len(lines)} parameters against their "
            f"rule ({names}): {lines[0].split(': ', 1)[1]}; choose a mesh.shape that "
            "divides them, or set mesh.strict=false to accept the copies")
    for line in lines:
        if warn is not None:
            warn(line)
    return lines
