"""The README main job (configs/arith_tiny.py as shipped) with several seeds: held-out accuracy,
truncation and mean response length at each eval, and wall time per run. Writes
<out>/RESULTS.md, <out>/curves.png, <out>/seed_<s>.jsonl (each run's metrics) and
<out>/walls.json; `--report-only` rebuilds the table and plot from those files.

    python scripts/learning_curves.py [--seeds 0,1,2] [--out bench/learning]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def run_seed(seed: int, out: Path) -> float:
    """Runs the main job with `seed` from scratch; copies its metrics to out; wall seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dapo_jax.train", "--config",
                        str(REPO / "configs" / "arith_tiny.py"), f"--config.trainer.seed={seed}",
                        f"--config.trainer.run_dir={tmp}"], cwd=REPO, check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
        wall = time.perf_counter() - start
        shutil.copy(Path(tmp) / "metrics.jsonl", out / f"seed_{seed}.jsonl")
    return wall


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="bench/learning")
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in a.seeds.split(",")]
    if not a.report_only:
        walls = {str(s): run_seed(s, out) for s in seeds}
        (out / "walls.json").write_text(json.dumps(walls) + "\n")
    walls = {int(s): w for s, w in json.loads((out / "walls.json").read_text()).items()}
    curves = {}
    for s in seeds:
        rows = [json.loads(line) for line in open(out / f"seed_{s}.jsonl")]
        curves[s] = {r["step"]: r for r in rows if "eval/all/accuracy" in r}
    steps = sorted(curves[seeds[0]])
    lines = [f"`python -m dapo_jax.train --config configs/arith_tiny.py`, seeds {seeds}, 2 CPU "
             "cores. Held-out accuracy at temperature 1 (256 problems x 4 samples); "
             "truncated fraction and mean response length (tokens) of those samples.", "",
             "| step | " + " | ".join(f"seed {s} acc / trunc / len" for s in seeds) + " |",
             "|---|" + "---|" * len(seeds)]
    for step in steps:
        cells = [f"{c[step]['eval/all/accuracy']:.3f} / {c[step]['eval/all/truncated_frac']:.3f}"
                 f" / {c[step]['eval/all/avg_response_length']:.1f}" for c in curves.values()]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    rise = [c[steps[-1]]["eval/all/accuracy"] - c[0]["eval/all/accuracy"]
            for c in curves.values()]
    lines += ["", "| seed | wall time (s) | accuracy rise |", "|---|---|---|"]
    lines += [f"| {s} | {walls[s]:.0f} | {r:+.3f} |" for s, r in zip(seeds, rise, strict=True)]
    lines.append(f"\nRise: mean {np.mean(rise):+.3f}, min {min(rise):+.3f}.")
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s, c in curves.items():
        ax.plot(steps, [c[t]["eval/all/accuracy"] for t in steps], marker="o", label=f"seed {s}")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy (temperature 1)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)


if __name__ == "__main__":
    main()
