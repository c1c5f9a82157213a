"""What the trainer's XLA GPU flags (`trainer.xla_gpu_flags`) change in the compiled 8x H100
program of a seed config's update, without a GPU: the program compiled with XLA's defaults,
with every flag, and with every flag but one, each in a process of its own (XLA reads
XLA_FLAGS once per process).

    python bench/gpu_flags.py [--config configs/dapo_qwen3_1p7b.py] [--preset qwen3-1.7b]
        [--remat full]

Needs the aot environment (`bash scripts/setup_envs.sh .venv-aot`; run it with
.venv-aot/bin/python). Per variant: asynchronous collectives and how many have compute
scheduled between their start and done, the peak per GPU, the dot FLOPs as compiled (the
same math whatever the schedule), the cuBLAS GEMMs and Triton GEMM fusions in the program,
and the compile time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def one(config: str, preset: str, remat: str) -> dict:
    """Compiles the update in this process, with whatever XLA_FLAGS it was started with."""
    from dapo_jax.experiments import targets
    from dapo_jax.experiments.hlo import Program

    s, model = targets.load_run(config, {"model.remat": remat}, preset)
    target = targets.get_target("h100x8", gpu_flags=())  # XLA_FLAGS as given, nothing added
    captured: dict[str, str] = {}
    compile_report = targets.compile_report

    class Keep:  # the lowered update, whose compiled text is kept as it compiles
        def __init__(self, lowered):
            self.lowered = lowered

        def compile(self):
            compiled = self.lowered.compile()
            captured["text"] = compiled.as_text()
            return compiled

    targets.compile_report = lambda name, lower, target, **kw: compile_report(
        name, lambda: Keep(lower()), target, **kw)
    report = targets.compile_config(s, model, target, functions=("update",))["update"]
    text = captured["text"]
    program = Program.parse(text)
    gemms = text.count('custom_call_target="__cublas$gemm"') + \
        text.count('custom_call_target="__cublas$lt$matmul"')
    return {"async": report.async_collectives, "overlapped": report.overlapped_collectives,
            "peak_gib": report.peak_bytes / 2**30, "tflop": program.flops() / 1e12,
            "cublas_gemms": gemms,
            "triton_gemm_fusions": len(re.findall(r'"kind":"__triton(_nested)?_gemm', text)),
            "compile_s": report.compile_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/dapo_qwen3_1p7b.py")
    p.add_argument("--preset", default="qwen3-1.7b")
    p.add_argument("--remat", default="full")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.config, a.preset, a.remat)))
        return
    from dapo_jax.train.config import GPU_XLA_FLAGS

    variants = {"XLA defaults": (), "all flags": GPU_XLA_FLAGS}
    for flag in GPU_XLA_FLAGS:
        variants[f"all but {flag.split('=')[0].removeprefix('--xla_gpu_')}"] = tuple(
            f for f in GPU_XLA_FLAGS if f != flag)
    print(f"{a.config} ({a.preset}), update, remat {a.remat}, compiled for 8x H100\n")
    print("| XLA GPU flags | async collectives (overlapped) | peak GiB | TFLOP | cuBLAS GEMMs "
          "| Triton GEMM fusions | compile s |\n|---|---|---|---|---|---|---|")
    for name, flags in variants.items():
        env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
        out = subprocess.run([sys.executable, __file__, "--one", "--config", a.config,
                              "--preset", a.preset, "--remat", a.remat], cwd=ROOT, env=env,
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"| {name} | failed: {out.stderr.strip().splitlines()[-1][:200]} |||||")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {name} | {r['async']} ({r['overlapped']}) | {r['peak_gib']:.2f} | "
              f"{r['tflop']:.4g} | {r['cublas_gemms']} | {r['triton_gemm_fusions']} | "
              f"{r['compile_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
