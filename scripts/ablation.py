"""DAPO ablation on the built-in arithmetic task, in the order of the DAPO paper's table 1:
naive GRPO, then adding overlong filtering, clip-higher, soft overlong punishment,
token-level loss and dynamic sampling. Several seeds each; writes a markdown table of final
held-out accuracy and steps-to-threshold, and a plot of held-out accuracy against step.

    python scripts/ablation.py [--seeds 0,1] [--steps 20] [--out bench/ablation]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configs import arith_tiny  # noqa: E402
from dapo_jax.train import config as config_lib  # noqa: E402
from dapo_jax.train.loop import run  # noqa: E402

# Each stage adds one DAPO component to the previous one (cumulative, as in the paper).
STAGES: list[tuple[str, dict]] = [
    ("naive GRPO", {
        "trainer.algorithm.policy_loss_type": "regular",
        "trainer.algorithm.eps_clip_high": 0.2,
        "trainer.algorithm.loss_reduction": "sequence_mean",
        "trainer.algorithm.overlong_buffer.len": 0,
        "trainer.algorithm.dynamic_sampling.type": "",
        "generator.apply_overlong_filtering": False,
    }),
    ("+ overlong filtering", {"generator.apply_overlong_filtering": True}),
    ("+ clip-higher", {"trainer.algorithm.eps_clip_high": 0.28}),
    ("+ soft overlong punishment", {"trainer.algorithm.overlong_buffer.len": 4}),
    ("+ token-level loss", {"trainer.algorithm.loss_reduction": "token_mean"}),
    ("+ dynamic sampling", {"trainer.algorithm.dynamic_sampling.type": "filter"}),
]


def configure(overrides: dict, seed: int, steps: int, run_dir: Path):
    c = arith_tiny.get_config()
    c.trainer.seed = seed
    c.trainer.max_steps = steps
    c.trainer.eval_interval = 5
    c.trainer.ckpt_interval = 0
    c.trainer.resume_mode = "none"
    c.trainer.logger = ("jsonl",)
    c.trainer.run_dir = str(run_dir)
    return config_lib.apply_overrides(c, overrides)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threshold", type=float, default=0.42, help="held-out accuracy")
    p.add_argument("--out", default="bench/ablation")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the table and plot from <out>/curves.json")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in a.seeds.split(",")]
    if a.report_only:
        curves = {k: [{int(s): v for s, v in r.items()} for r in runs]
                  for k, runs in json.loads((out / "curves.json").read_text()).items()}
        report(curves, a.steps, seeds, a.threshold, out)
        return
    curves: dict[str, list[dict[int, float]]] = {}
    overrides: dict = {}
    for name, change in STAGES:
        overrides = {**overrides, **change}
        curves[name] = []
        for seed in seeds:
            run_dir = out / "runs" / f"{len(curves)}_{seed}"
            run(configure(overrides, seed, a.steps, run_dir))
            rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
            curves[name].append({r["step"]: r["eval/all/accuracy"] for r in rows
                                 if "eval/all/accuracy" in r})
            print(f"{name} seed {seed}: {curves[name][-1]}", flush=True)
    (out / "curves.json").write_text(json.dumps(curves, indent=1))
    report(curves, a.steps, seeds, a.threshold, out)


def report(curves: dict[str, list[dict[int, float]]], steps: int, seeds: list[int],
           threshold: float, out: Path) -> None:
    """Writes RESULTS.md (final accuracy, steps to `threshold`) and ablation.png."""
    lines = [f"Built-in arithmetic task, {steps} steps, seeds {seeds}; held-out accuracy "
             f"(256 problems, 4 samples each, temperature 1, top_p 1), evaluated every 5 steps.",
             "", f"| stage | final accuracy (mean ± sd) | steps to {threshold:.2f} (mean over "
             "seeds reaching it) |", "|---|---|---|"]
    for name, runs in curves.items():
        final = np.array([r[max(r)] for r in runs])
        reach = [min((s for s, v in r.items() if v >= threshold), default=None) for r in runs]
        hit = [s for s in reach if s is not None]
        reach_str = f"{np.mean(hit):.0f} ({len(hit)}/{len(runs)} seeds)" if hit else "never"
        lines.append(f"| {name} | {final.mean():.3f} ± {final.std():.3f} | {reach_str} |")
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, runs in curves.items():
        points = sorted(runs[0])
        ax.plot(points, [np.mean([r[s] for r in runs]) for s in points], marker="o", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=120)


if __name__ == "__main__":
    main()
