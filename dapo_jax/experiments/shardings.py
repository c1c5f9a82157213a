"""How a config lays its model's parameters out on its mesh, without devices:

    python -m dapo_jax.experiments.shardings --config configs/dapo_qwen3_1p7b.py \\
        --preset qwen3-1.7b --target h100x8 [--json golden.json] [--config.mesh.shape=(1,1,8)]

Prints, per parameter, its PartitionSpec (from `sharding.LOGICAL_RULES`) and bytes per
device in the trainer's parameter dtype, the total, and a warning for each parameter the
mesh replicates against its rule (a split the mesh does not divide: Qwen2.5-Math-7B's 28
query heads on tensor=8). `--json` writes the same as a golden file, like MaxText's
sharding dumps: tests/goldens/sharding/ holds one per seed config, and test_sharding
checks them, so a change of layout is a visible diff (`--json` again to accept it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from jax.sharding import AbstractMesh

from dapo_jax.models import QwenConfig
from dapo_jax.models.qwen import abstract_params, parameter_layouts
from dapo_jax.sharding import (
    MESH_AXES,
    ParamLayout,
    ReplicatedParameters,
    check_replication,
    mesh_label,
    resolve_mesh_shape,
)
from dapo_jax.train.settings import Settings

# Devices of each compile target (experiments/targets.py: v5p types count TensorCores).
TARGET_DEVICES = {"h100x8": 8, "v5p-8": 4, "v5p-16": 8, "v6e-8": 8, "v5e-8": 8}


def layout(s: Settings, model: QwenConfig, num_devices: int
           ) -> tuple[AbstractMesh, list[ParamLayout]]:
    """The run's mesh over `num_devices` and every parameter of `model` on it."""
    mesh = AbstractMesh(resolve_mesh_shape(s.mesh.shape, num_devices), MESH_AXES)
    return mesh, parameter_layouts(abstract_params(model, s.model.precision), mesh)


def golden(mesh: AbstractMesh, layouts: list[ParamLayout]) -> dict[str, Any]:
    """The layout as a JSON-able dict: mesh, parameter path -> spec, shape and bytes per
    device, the total, and the parameters replicated against their rule."""
    spec = lambda p: [list(a) if isinstance(a, tuple) else a for a in p.spec]
    return {
        "mesh": {a: int(mesh.shape[a]) for a in MESH_AXES},
        "params": {p.path: {"spec": spec(p), "shape": list(p.shape), "dtype": p.dtype,
                            "bytes_per_device": p.bytes_per_device(mesh)} for p in layouts},
        "bytes_per_device": sum(p.bytes_per_device(mesh) for p in layouts),
        "replicated": [p.path for p in layouts if p.replicated],
    }


def golden_text(g: dict[str, Any]) -> str:
    """A golden as JSON with one line per parameter (a layout change is a one-line diff)."""
    params = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in g["params"].items())
    return (f'{{\n "mesh": {json.dumps(g["mesh"])},\n "params": {{\n{params}\n }},\n'
            f' "bytes_per_device": {g["bytes_per_device"]},\n'
            f' "replicated": {json.dumps(g["replicated"])}\n}}\n')


def table(mesh: AbstractMesh, layouts: list[ParamLayout]) -> str:
    lines = [f"mesh {mesh_label(mesh)}", "",
             "| parameter | shape | spec | GiB per device |", "|---|---|---|---|"]
    for p in layouts:
        lines.append(f"| {p.path} | {list(p.shape)} | {p.spec} | "
                     f"{p.bytes_per_device(mesh) / 2**30:.3f} |")
    total = sum(p.bytes_per_device(mesh) for p in layouts)
    full = sum(math.prod(p.shape) * np.dtype(p.dtype).itemsize for p in layouts)
    lines += ["", f"parameters per device: {total / 2**30:.3f} GiB of {full / 2**30:.3f} GiB"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from dapo_jax.experiments.targets import load_run, parse_overrides
    from dapo_jax.train.config import ConfigError

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--preset", default="", help="model shape (default: model.path's)")
    parser.add_argument("--target", default="h100x8", choices=sorted(TARGET_DEVICES))
    parser.add_argument("--json", default="", help="write the golden file here")
    args, rest = parser.parse_known_args(argv)
    try:
        s, model = load_run(args.config, parse_overrides(rest), args.preset)
        mesh, layouts = layout(s, model, TARGET_DEVICES[args.target])
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(mesh, layouts))
    try:
        check_replication(layouts, mesh, strict=s.mesh.strict,
                          warn=lambda line: print(f"warning: {line}", file=sys.stderr))
    except ReplicatedParameters as e:
        print(f"error: mesh.shape: {e}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(golden_text(golden(mesh, layouts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
