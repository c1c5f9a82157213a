"""DAPO ablation on the built-in chain-sum task, in the order of the DAPO paper's table 1:
naive GRPO, then adding overlong filtering, clip-higher, soft overlong punishment, token-level
loss and dynamic sampling (cumulative). Several seeds per stage. Besides held-out accuracy it
records each component's own mechanism metric:

- clip-higher: policy entropy (`policy/entropy`, mean over the run's second half);
- overlong filtering / soft punishment: held-out truncation rate and mean response length;
- token-level loss: how far the mean response length moves from its start;
- dynamic sampling: optimiser steps and generation batches drawn to reach `--threshold`.

Writes <out>/RESULTS.md (mean ± sd over seeds), <out>/ablation.png and <out>/runs.json
(every run's per-step metrics; `--report-only` rebuilds the table and plots from it).

    python scripts/ablation.py [--seeds 0,1,2] [--steps 40] [--out bench/ablation]
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
from dapo_jax.train.settings import Settings  # noqa: E402

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
    ("+ soft overlong punishment", {"trainer.algorithm.overlong_buffer.len":
                                    arith_tiny.OVERLONG_BUFFER}),
    ("+ token-level loss", {"trainer.algorithm.loss_reduction": "token_mean"}),
    ("+ dynamic sampling", {"trainer.algorithm.dynamic_sampling.type": "filter"}),
]
KEYS = ("eval/all/accuracy", "eval/all/truncated_frac", "eval/all/avg_response_length",
        "policy/entropy", "generate/avg_response_length", "generate/truncated_frac",
        "dynamic_sampling/batches_drawn", "reward/accuracy", "policy/clip_frac_high")


def configure(overrides: dict, seed: int, steps: int, eval_every: int, run_dir: Path):
    c = arith_tiny.get_config()
    c.trainer.seed = seed
    c.trainer.max_steps = steps
    c.trainer.eval_interval = eval_every
    c.data.builtin_val_size = 128  # x 4 samples: resampling sd 0.02 (README)
    c.trainer.ckpt_interval = 0
    c.trainer.resume_mode = "none"
    c.trainer.logger = ("jsonl",)
    c.trainer.run_dir = str(run_dir)
    return config_lib.apply_overrides(c, overrides)


def per_step(run_dir: Path) -> dict[str, dict[int, float]]:
    """{metric: {step: value}} from a run's metrics.jsonl (eval rows and step rows)."""
    out: dict[str, dict[int, float]] = {k: {} for k in KEYS}
    for line in open(run_dir / "metrics.jsonl"):
        row = json.loads(line)
        for k in KEYS:
            if k in row:
                out[k][row["step"]] = row[k]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--threshold", type=float, default=0.7, help="held-out accuracy")
    p.add_argument("--out", default="bench/ablation")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the table and plots from <out>/runs.json")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in a.seeds.split(",")]
    if not a.report_only:
        runs: dict[str, list[dict]] = {}
        overrides: dict = {}
        for i, (name, change) in enumerate(STAGES):
            overrides = {**overrides, **change}
            runs[name] = []
            for seed in seeds:
                run_dir = out / "runs" / f"{i}_{seed}"
                run(Settings.from_config(configure(overrides, seed, a.steps, a.eval_every,
                                                   run_dir)))
                runs[name].append(per_step(run_dir))
                acc = runs[name][-1]["eval/all/accuracy"]
                print(f"{name} seed {seed}: held-out accuracy {acc}", flush=True)
            (out / "runs.json").write_text(json.dumps(runs))
    runs = {name: [{k: {int(s): v for s, v in m.items()} for k, m in r.items()} for r in rs]
            for name, rs in json.loads((out / "runs.json").read_text()).items()}
    report(runs, a.threshold, out)


def _first(curve: dict[int, float], threshold: float) -> int | None:
    return min((s for s, v in curve.items() if v >= threshold), default=None)


def summarize(r: dict[str, dict[int, float]], threshold: float) -> dict[str, float]:
    """One run's row of the table (NaN where a quantity is undefined, e.g. never reached)."""
    acc, length = r["eval/all/accuracy"], r["eval/all/avg_response_length"]
    first, last = min(acc), max(acc)
    reach = _first(acc, threshold)
    batches = r["dynamic_sampling/batches_drawn"]
    # A stage without dynamic sampling draws one generation batch per step.
    drawn = lambda upto: sum(batches.get(s, 1.0) for s in range(1, upto + 1))
    entropy = r["policy/entropy"]
    half = sorted(entropy)[len(entropy) // 2:]
    return {
        "accuracy": acc[last], "gain": acc[last] - acc[first],
        "steps_to": float(reach) if reach is not None else np.nan,
        "batches_to": drawn(reach) if reach is not None else np.nan,
        "batches_per_step": drawn(last) / last,
        "entropy": float(np.mean([entropy[s] for s in half])),
        "truncated": r["eval/all/truncated_frac"][last],
        "length": length[last], "length_change": length[last] - length[first],
    }


COLUMNS = [("accuracy", "final acc", "{:.3f}"), ("gain", "acc gain", "{:+.3f}"),
           ("steps_to", "steps to thr", "{:.1f}"), ("batches_to", "gen batches to thr", "{:.1f}"),
           ("batches_per_step", "gen batches / step", "{:.2f}"),
           ("entropy", "entropy (2nd half)", "{:.3f}"), ("truncated", "truncated", "{:.3f}"),
           ("length", "mean length", "{:.1f}"), ("length_change", "length change", "{:+.1f}")]


def report(runs: dict[str, list[dict]], threshold: float, out: Path) -> None:
    """Writes RESULTS.md (mean ± sd over seeds per stage) and ablation.png."""
    seeds = len(next(iter(runs.values())))
    steps = max(next(iter(runs.values()))[0]["eval/all/accuracy"])
    lines = [f"Built-in chain-sum task, {steps} steps, {seeds} seeds per stage; held-out "
             "accuracy, truncation and length at temperature 1 (top_p 1). Mean ± sd over seeds; "
             f"'thr' = held-out accuracy {threshold:.2f} (mean over the seeds reaching it, "
             "count in brackets).", "",
             "| stage | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for name, rs in runs.items():
        rows = [summarize(r, threshold) for r in rs]
        cells = []
        for key, _, fmt in COLUMNS:
            vals = np.array([row[key] for row in rows])
            ok = vals[~np.isnan(vals)]
            if not ok.size:
                cells.append("never")
                continue
            cell = f"{fmt.format(ok.mean())} ± {fmt.format(ok.std()).lstrip('+')}"
            cells.append(cell + (f" ({ok.size}/{vals.size})" if ok.size < vals.size else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("eval/all/accuracy", "held-out accuracy"), ("policy/entropy", "policy entropy"),
              ("eval/all/truncated_frac", "held-out truncated fraction"),
              ("eval/all/avg_response_length", "held-out mean length (tokens)")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (key, label) in zip(axes.flat, panels, strict=True):
        for name, rs in runs.items():
            points = sorted(set.intersection(*(set(r[key]) for r in rs)))
            ax.plot(points, [np.mean([r[key][s] for r in rs]) for s in points], label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=110)


if __name__ == "__main__":
    main()
