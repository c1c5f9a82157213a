"""Mesh-shape experiments: which mesh and micro-batch fit a seed run on 8 x H100 (80 GB)?

    python -m dapo_jax.experiments.mesh --preset qwen3-4b --mesh 1x8x1,2x4x1,1x4x2,8x1x1 \\
        --seq-len 10240 --micro-batch 1 [--out bench/mesh] [--time-steps 0]

For each mesh it compiles the real update step (the DAPO loss on chunked log-probs, AdamW,
float32 master weights with bf16 compute, remat) on abstract parameters
(`jax.ShapeDtypeStruct`, nothing allocated) over 8 simulated CPU devices, and reports per
device, from XLA's memory analysis and the
compiled HLO: parameters, optimiser state, activations + temporaries, collective bytes, and
whether it fits; plus the model FLOPs per device (`train_flops_per_token`: XLA's cost
analysis counts a while loop's body once, so it misses most of the scanned layers).
For small presets `--time-steps N` also runs the real step N times on CPU.
Writes a markdown table and a CSV, and a PNG plot when matplotlib is installed
(`pip install -e ".[bench]"`).

XLA:CPU memory figures are an estimate of the GPU's: the CPU compiler makes different
fusion and scheduling choices. Training attention runs in query blocks
(`dapo_jax.models.qwen.attention`), so each layer holds scores of [B, N, block, <= T].
The seed configs' whole memory plan (trainer + vLLM sidecar per GPU) is
`python -m dapo_jax.experiments.memory`.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import argparse  # noqa: E402
import csv  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from dapo_jax.experiments.timing import (  # noqa: E402
    BENCH_LOSS,
    BENCH_OPTIMIZER,
    synthetic_batch,
    train_flops_per_token,
    update_seconds,
)
from dapo_jax.models import Precision, Qwen, QwenConfig, preset, state_shardings  # noqa: E402
from dapo_jax.sharding import make_mesh  # noqa: E402
from dapo_jax.train.update import (  # noqa: E402
    BATCH_KEYS,
    make_optimizer,
    make_train_fns,
    optimizer_shardings,
)

H100_BYTES = 80e9
_COLLECTIVE = re.compile(
    r"=\s*([a-z0-9\[\],{}()\s]+?)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|"
    r"collective-permute)(?:-start)?\(")
_SHAPE = re.compile(r"(bf16|f32|f16|s32|u32|pred|s8|u8)\[([\d,]*)\]")
_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}


def collective_bytes(hlo: str) -> float:
    """Sum of the output sizes of the collectives in the compiled HLO (per device)."""
    total = 0.0
    for result, _ in _COLLECTIVE.findall(hlo):
        for dtype, dims in _SHAPE.findall(result):
            total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def per_device_bytes(tree) -> float:
    """Bytes of one device's shards of an abstract (sharded) tree."""
    total = 0.0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


def abstract_train_state(cfg: QwenConfig, precision: Precision, remat: str,
                         optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh
                         ) -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, params, optimiser state) as sharded `jax.ShapeDtypeStruct`s: nothing is
    allocated, so any model size compiles on a CPU."""
    abstract = nnx.eval_shape(lambda: Qwen(cfg, precision=precision, remat=remat,
                                           rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    params = jax.tree.map(with_sharding, state, state_shardings(state, mesh))
    opt_state = jax.tree.map(with_sharding, jax.eval_shape(optimizer.init, params),
                             optimizer_shardings(optimizer, params))
    return graphdef, params, opt_state


def abstract_batch(rows: int, seq_len: int, mesh: jax.sharding.Mesh,
                   keys: tuple[str, ...] = BATCH_KEYS) -> dict[str, jax.ShapeDtypeStruct]:
    """A training (mini-)batch of `rows` x `seq_len`, sharded over the batch axes."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    dtype = lambda k: jnp.int32 if k in ("input_ids", "segment_ids", "positions") else \
        jnp.float32
    return {k: jax.ShapeDtypeStruct((rows, seq_len), dtype(k), sharding=sharding)
            for k in keys}


def analyse(preset_name: str, mesh_shape: tuple[int, ...], seq_len: int, micro_batch: int,
            time_steps: int) -> dict[str, float | str]:
    cfg = preset(preset_name)
    mesh = make_mesh(mesh_shape)
    dp = mesh_shape[0] * mesh_shape[1]
    optimizer = make_optimizer(BENCH_OPTIMIZER)
    graphdef, params, opt_state = abstract_train_state(
        cfg, Precision("float32", "bfloat16"), "full", optimizer, mesh)
    rows = micro_batch * dp  # one micro-batch per device per step
    batch = abstract_batch(rows, seq_len, mesh)
    fns = make_train_fns(graphdef, params, optimizer, BENCH_LOSS, mesh=mesh)
    start = time.perf_counter()
    compiled = fns.lower_update(params, opt_state, batch).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    param_b, opt_b = per_device_bytes(params), per_device_bytes(opt_state)
    total = mem.argument_size_in_bytes + mem.temp_size_in_bytes
    out: dict[str, float | str] = {
        "mesh": "x".join(map(str, mesh_shape)), "micro_batch": micro_batch, "seq_len": seq_len,
        "params_GB": param_b / 1e9, "opt_state_GB": opt_b / 1e9,
        "activations_temps_GB": mem.temp_size_in_bytes / 1e9, "total_GB": total / 1e9,
        "fits_80GB": "yes" if total <= H100_BYTES else "no",
        "model_TFLOP_per_device": rows * seq_len * train_flops_per_token(cfg, seq_len)
        / mesh.size / 1e12,
        "collective_GB": collective_bytes(compiled.as_text()) / 1e9,
        "compile_s": compile_s,
    }
    if time_steps:
        out["step_s_cpu"] = update_seconds(cfg, synthetic_batch(cfg, rows, seq_len),
                                           time_steps, precision=Precision("float32", "float32"),
                                           mesh=mesh)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3-4b")
    p.add_argument("--mesh", default="1x8x1,2x4x1,1x4x2,8x1x1")
    p.add_argument("--seq-len", type=int, default=10240)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--time-steps", type=int, default=0)
    p.add_argument("--out", default="bench/mesh")
    a = p.parse_args()
    results = []
    for m in a.mesh.split(","):
        shape = tuple(int(x) for x in m.split("x"))
        r = analyse(a.preset, shape, a.seq_len, a.micro_batch, a.time_steps)
        results.append(r)
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{a.preset}_T{a.seq_len}_mb{a.micro_batch}"
    keys = list(results[0])
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(results)
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)
    table = [f"preset {a.preset}, seq {a.seq_len}, micro-batch {a.micro_batch} per device, "
             "float32 master weights and AdamW state, bf16 compute, remat full; per-device "
             "figures from XLA:CPU's analyses (8 simulated devices)", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    table += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in results]
    (out / f"{stem}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    try:
        import matplotlib
    except ImportError:
        print(f"(no plot: matplotlib is not installed; pip install -e \".[bench]\" for "
              f"{out / stem}.png)")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r["mesh"] for r in results]
    bottom = np.zeros(len(results))
    for key in ("params_GB", "opt_state_GB", "activations_temps_GB"):
        vals = np.array([r[key] for r in results])
        ax.bar(names, vals, bottom=bottom, label=key.replace("_GB", ""))
        bottom += vals
    ax.axhline(H100_BYTES / 1e9, color="red", linestyle="--", label="H100 80 GB")
    ax.set_ylabel("GB per device")
    ax.set_title(f"{a.preset}, seq {a.seq_len}, micro-batch {a.micro_batch}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=120)


if __name__ == "__main__":
    main()
