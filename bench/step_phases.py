"""A seed config's DAPO step, phase by phase, at the seed's shape shrunk: the embedded tiny
model on 8 simulated CPU devices, the config's own mesh (FSDP over 8), precision, loss,
shaping and dynamic sampling; sizes shrunk (prompts, lengths, batch), generation in process.

    python bench/step_phases.py [--config configs/dapo_qwen3_1p7b.py] [--steps 8]

Prints the median of each timing/* metric over steps 2 .. steps-1 (the first compiles, the
last saves) and the median step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent


def shrunk(config: str, steps: int, run_dir: str):
    from dapo_jax.train.config import apply_overrides, load_config_file

    cfg = load_config_file(str(ROOT / config))
    return apply_overrides(cfg, {
        "model.path": str(ROOT / "dapo_jax" / "assets" / "arith_base"),
        "data.train_data": "builtin:arithmetic", "data.val_data": "",
        "data.builtin_train_size": 1024, "reward.fn": "arithmetic",
        "trainer.run_dir": run_dir, "trainer.max_steps": steps, "trainer.resume_mode": "none",
        "trainer.eval_before_train": False, "trainer.eval_interval": 0,
        "trainer.ckpt_interval": 0, "trainer.hf_save_interval": 0,
        "trainer.max_prompt_length": 56, "trainer.train_batch_size": 16,
        "trainer.policy_mini_batch_size": 8,
        "generator.sampling_params.max_generate_length": 64,
        "generator.eval_sampling_params.max_generate_length": 64,
        "trainer.algorithm.overlong_buffer.len": 12, "generator.backend": "jax",
        "trainer.algorithm.dynamic_sampling.max_sample_batches": 30,
    })


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/dapo_qwen3_1p7b.py")
    p.add_argument("--steps", type=int, default=8)
    a = p.parse_args()
    if a.steps < 3:
        p.error("--steps must be >= 3")
    from dapo_jax.train import loop
    from dapo_jax.train.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        cfg = shrunk(a.config, a.steps, tmp)
        loop.run(Settings.from_config(cfg))
        rows = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] >= 1][1:-1]
    keys = sorted({k for r in rows for k in r if k.startswith("timing/")})
    print(f"{a.config} shrunk, 8 CPU devices, median of steps 2..{a.steps - 1}:")
    for k in keys:
        print(f"  {k:24s} {statistics.median(r.get(k, 0.0) for r in rows):.3f} s")


if __name__ == "__main__":
    main()
