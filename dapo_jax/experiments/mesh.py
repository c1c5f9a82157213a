"""Mesh-shape experiments: which mesh and micro-batch fit a seed run on 8 x H100 (80 GB)?

    python -m dapo_jax.experiments.mesh --preset qwen3-4b --mesh 1x8x1,2x4x1,1x4x2,8x1x1 \\
        --seq-len 10240 --micro-batch 1 [--out bench/mesh] [--time-steps 0]

For each mesh it compiles the real update step (the DAPO loss on chunked log-probs, AdamW,
float32 master weights with bf16 compute, remat) on abstract parameters
(`jax.ShapeDtypeStruct`, nothing allocated) for `--target` (default h100x8: the H100
compiler through the CUDA plugin, `dapo_jax.experiments.targets`; 8 simulated CPU devices,
labelled, when the aot extra is not installed), and reports per device, from the target
compiler's memory analysis and the compiled HLO: parameters, optimiser state, activations
+ temporaries, collective bytes, and whether it fits; plus the model FLOPs per device
(`train_flops_per_token`: XLA's cost analysis counts a while loop's body once, so it misses
most of the scanned layers).
For small presets `--time-steps N` also runs the real step N times on CPU.
Writes a markdown table and a CSV, and a PNG plot when matplotlib is installed
(`pip install -e ".[bench]"`).

Attention is `auto` for the target (a fused kernel on GPU/TPU, per device; on CPU our XLA
attention in query blocks, [B, N, block, <= T] scores per layer).
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
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from dapo_jax.experiments import targets  # noqa: E402
from dapo_jax.experiments.timing import (  # noqa: E402
    BENCH_LOSS,
    BENCH_OPTIMIZER,
    synthetic_batch,
    train_flops_per_token,
    update_seconds,
)
from dapo_jax.models import Precision, preset  # noqa: E402
from dapo_jax.models.kernels import resolve_attention_impl  # noqa: E402
from dapo_jax.sharding import make_mesh  # noqa: E402
from dapo_jax.train.update import (  # noqa: E402
    abstract_batch,
    abstract_train_state,
    make_optimizer,
    make_train_fns,
    per_device_bytes,
)


def analyse(preset_name: str, mesh_shape: tuple[int, ...], seq_len: int, micro_batch: int,
            time_steps: int, target: targets.Target) -> dict[str, float | str]:
    cfg = preset(preset_name)
    mesh = make_mesh(mesh_shape, devices=list(target.devices))
    dp = mesh_shape[0] * mesh_shape[1]
    optimizer = make_optimizer(BENCH_OPTIMIZER)
    graphdef, params, opt_state = abstract_train_state(
        cfg, Precision("float32", "bfloat16"), "full", optimizer, mesh)
    rows = micro_batch * dp  # one micro-batch per device per step
    batch = abstract_batch(rows, seq_len, mesh)
    fns = make_train_fns(graphdef, params, optimizer, BENCH_LOSS, mesh=mesh)
    r = targets.compile_report("update", lambda: fns.lower_update(params, opt_state, batch),
                               target, requested_kernel=resolve_attention_impl(
                                   "auto", target.platform, device=target.devices[0],
                                   head_dim=cfg.head_dim, dtype="bfloat16"), global_rows=rows,
                               local_rows=micro_batch)
    param_b, opt_b = per_device_bytes(params), per_device_bytes(opt_state)
    out: dict[str, float | str] = {
        "mesh": "x".join(map(str, mesh_shape)), "micro_batch": micro_batch, "seq_len": seq_len,
        "params_GB": param_b / 1e9, "opt_state_GB": opt_b / 1e9,
        "activations_temps_GB": r.temp_bytes / 1e9, "total_GB": r.peak_bytes / 1e9,
        "fits": "yes" if r.fits else "no",
        "model_TFLOP_per_device": rows * seq_len * train_flops_per_token(cfg, seq_len)
        / mesh.size / 1e12,
        "collective_GB": r.collective_bytes / 1e9,
        "compile_s": r.compile_s,
    }
    if time_steps:
        out["step_s_cpu"] = update_seconds(cfg, synthetic_batch(cfg, rows, seq_len),
                                           time_steps, precision=Precision("float32", "float32"),
                                           mesh=make_mesh(mesh_shape))
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
    p.add_argument("--target", default="h100x8", help="h100x8, v5p-16, v6e-8, v5e-8, cpu or a "
                   "GPU target description (8 devices)")
    a = p.parse_args()
    try:
        target = targets.get_target(a.target, cpu_fallback=True)
    except targets.TargetError as e:
        raise SystemExit(f"error: {e}") from None
    if len(target.devices) != 8:
        raise SystemExit(f"error: target {a.target} has {len(target.devices)} devices; the "
                         "meshes here are of 8")
    results = []
    for m in a.mesh.split(","):
        shape = tuple(int(x) for x in m.split("x"))
        r = analyse(a.preset, shape, a.seq_len, a.micro_batch, a.time_steps, target)
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
             f"figures from the compiled program, {target.label}", "",
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
    ax.axhline(target.memory_bytes / 1e9, color="red", linestyle="--",
               label=f"{target.name} memory")
    ax.set_ylabel("GB per device")
    ax.set_title(f"{a.preset}, seq {a.seq_len}, micro-batch {a.micro_batch}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=120)


if __name__ == "__main__":
    main()
