"""Compile a run's functions for the hardware it targets, without that hardware:

    python -m dapo_jax.experiments.compile --config configs/dapo_qwen3_1p7b.py \\
        --target h100x8|v5p-8|v6e-8|v5e-8|local|<GPU target description .txtpb> \\
        [--preset qwen3-1.7b] [--attention-impl xla] [--functions update,logprobs,generate] \\
        [--json r.json] [--config.trainer.micro_train_batch_size_per_gpu=1 ...]

It builds the target's devices (libtpu topologies; the CUDA PJRT plugin with a target
description, dapo_jax/assets/targets/h100_sxm_80gb.txtpb for h100x8; `local`: this
machine's own GPUs or TPU, compiled by their own backend, the check that the kernels
compile on a GPU machine: pass `--config.mesh.shape=(1,-1,1)` for fewer than 8), compiles the real
update, old-log-prob pass and generation engine (prefill + decode) at the config's shapes
and mesh on abstract weights (`--preset`, or model.path's config.json), and prints per
device: arguments, outputs, temporaries, peak and what else the process holds against the
chip's memory, whether it fits (a compile-time out-of-memory is "does not fit" with the
bytes asked), compile seconds, collective bytes per call, and the attention in the compiled
program (the kernel's custom call, or xla). It warns when a requested kernel is absent and
when a kernel runs on the global batch. With `model.remat=auto` it compiles the update under
each recompute policy, least recompute first, and keeps the first that fits the trainer's
share of the chip (`dapo_jax.train.update.choose_remat`, the trainer's own rule); every row
says its policy, the update's FLOPs (dots as compiled, `dapo_jax.experiments.hlo`) beside
remat=full's, and its asynchronous collectives (with compute between start and done).
`--json` writes, per function, peak_bytes, memory_bytes, fits, collective_bytes, flops,
full_flops, remat, async_collectives, overlapped_collectives, attention, compile_s, notes
(and the rest of the report).
Needs the aot extra (`pip install -e ".[aot]"`: libtpu, the CUDA plugin, ptxas).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import jax

from dapo_jax.experiments import targets
from dapo_jax.models.kernels import ATTENTION_IMPLS
from dapo_jax.train import config as config_lib

GIB = 2**30


def table(target: targets.Target, reports: dict[str, targets.FunctionReport]) -> str:
    gib = lambda b: f"{b / GIB:.2f}"
    lines = [f"target {target.label}; memory in GiB per device of "
             f"{gib(target.memory_bytes)}, collectives in GB per device and call, TFLOP per "
             "device and call (dots as compiled, recompute included; remat=full's beside)", "",
             "| function | remat | arguments | outputs | temporaries | peak | + resident | fits | "
             "collectives | async (overlapped) | TFLOP (full) | attention | compile s |",
             "|" + "---|" * 13]
    for r in reports.values():
        fits = "yes" if r.fits else f"**no** {r.error}".strip()
        flops = f"{r.flops / 1e12:.3g}" + (f" ({r.full_flops / 1e12:.3g})" if r.full_flops else "")
        lines.append(f"| {r.name} | {r.remat} | {gib(r.argument_bytes)} | {gib(r.output_bytes)} | "
                     f"{gib(r.temp_bytes)} | {gib(r.peak_bytes)} | {gib(r.resident_bytes)} | "
                     f"{fits} | {r.collective_bytes / 1e9:.3f} | {r.async_collectives} "
                     f"({r.overlapped_collectives}) | {flops} | {r.attention} | "
                     f"{r.compile_s:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--target", required=True,
                   help=f"{', '.join(targets.TARGETS)}, or a GPU target description file")
    p.add_argument("--preset", default="", help="model shape when model.path is not here")
    p.add_argument("--attention-impl", default="", choices=("",) + ATTENTION_IMPLS)
    p.add_argument("--functions", default=",".join(targets.FUNCTIONS))
    p.add_argument("--json", default="")
    a, rest = p.parse_known_args(argv)
    if a.target != "local" and not os.environ.get("JAX_PLATFORMS"):
        # Deviceless: the host's own accelerators (none, or the wrong ones) stay out of it.
        jax.config.update("jax_platforms", "cpu")
    # tokamax logs an "autotuning cache miss" per kernel shape: without a device nothing is
    # autotuned, and its default block sizes are what gets compiled.
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        s, model = targets.load_run(a.config, targets.parse_overrides(rest), a.preset)
        target = targets.get_target(a.target, gpu_flags=s.placement.xla_gpu_flags)
        functions = tuple(f for f in a.functions.split(",") if f)
        reports = targets.compile_config(s, model, target,
                                         attention_impl=a.attention_impl or None,
                                         functions=functions)
    except (targets.TargetError, config_lib.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(target, reports))
    for r in reports.values():
        for note in r.notes:
            print(f"{r.name}: {note}")
        for w in r.warnings:
            print(f"warning: {r.name}: {w}", file=sys.stderr)
    if a.json:
        Path(a.json).write_text(json.dumps({
            "config": a.config, "target": target.name, "device_kind": target.device_kind,
            "num_devices": len(target.devices), "mesh": list(s.mesh.shape),
            "versions": targets.versions(),
            "functions": {k: r.as_json() for k, r in reports.items()}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
