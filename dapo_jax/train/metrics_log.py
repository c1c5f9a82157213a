"""Where metrics go: console, `<run_dir>/metrics.jsonl` (one JSON object per line, always
with `step`), and optionally TensorBoard (tensorboardX, <run_dir>/tensorboard) and Weights &
Biases (under <run_dir>/wandb; WANDB_MODE=offline keeps the run local, `wandb sync` uploads
it later). A non-finite value is written as null to the JSONL file and left out elsewhere."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def route_library_logs(log_file: Path) -> None:
    """Library log lines (orbax writes several INFO lines per checkpoint, through absl) go
    to `log_file`; the terminal keeps warnings and errors, the step lines and the bar."""
    from absl import logging as absl_logging

    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    absl_logging.get_absl_handler().setLevel(logging.WARNING)  # absl's stderr handler


def device_memory(devices: Sequence[Any]) -> dict[str, float]:
    """`memory/peak_gib`, the most any of `devices` has held since the process started,
    and `memory/limit_gib`, the least its allocator may take (XLA_PYTHON_CLIENT_MEM_FRACTION
    of a GPU): what to compare with the compile tool's peak and the placement's split. Empty
    where the devices report no memory (CPU)."""
    stats = [s for s in (d.memory_stats() for d in devices) if s]
    if not stats:
        return {}
    return {"memory/peak_gib": max(s.get("peak_bytes_in_use", 0) for s in stats) / 2**30,
            "memory/limit_gib": min(s.get("bytes_limit", 0) for s in stats) / 2**30}


CONSOLE_KEYS = ("reward/avg_raw_reward", "reward/accuracy", "policy/grad_norm",
                "policy/entropy", "generate/avg_response_length",
                "dynamic_sampling/batches_drawn", "eval/all/accuracy", "timing/step")


class MetricsLog:
    def __init__(self, run_dir: Path, loggers: Sequence[str], *, project: str, run_name: str,
                 config: dict[str, Any], write: bool = True):
        self.write = write
        self.jsonl = None
        self.tb = None
        self.wandb = None
        self.console = "console" in loggers
        if not write:
            return
        if "jsonl" in loggers:
            self.jsonl = open(run_dir / "metrics.jsonl", "a")
        if "tensorboard" in loggers:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise ImportError("trainer.logger has 'tensorboard': pip install tensorboardX"
                                  ) from None
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if "wandb" in loggers:
            try:
                import wandb
            except ImportError:
                raise ImportError("trainer.logger has 'wandb': pip install wandb") from None
            self.wandb = wandb.init(project=project, name=run_name or None, config=config,
                                    dir=str(run_dir))

    def log(self, step: int, metrics: dict[str, float], echo: Any = print) -> None:
        if not self.write:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        bad = [k for k, v in clean.items() if not math.isfinite(v)]
        if bad:  # logged as null, never as NaN in the file; the trainer decides what to do
            clean.update({k: None for k in bad})
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
            self.jsonl.flush()
        if self.tb:
            for k, v in clean.items():
                if v is not None:
                    self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log({k: v for k, v in clean.items() if v is not None}, step=step)
        if self.console:
            shown = [f"{k}={clean[k]:.4g}" for k in CONSOLE_KEYS if clean.get(k) is not None]
            echo(f"step {step}: " + " ".join(shown))

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
