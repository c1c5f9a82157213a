"""The metric writers for real: TensorBoard (tensorboardX event files) and Weights & Biases
(offline run files), read back after logging. A non-finite value is never written."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from dapo_jax.train.metrics_log import MetricsLog, device_memory
from tests.launching import wait_for

STEPS = [{"reward/accuracy": 0.25, "policy/grad_norm": 1.5},
         {"reward/accuracy": 0.5, "policy/grad_norm": float("nan")},
         {"reward/accuracy": 0.75, "policy/grad_norm": 0.5}]


def log_steps(run_dir: Path, loggers: tuple[str, ...]) -> None:
    log = MetricsLog(run_dir, loggers, project="dapo_jax_test", run_name="loggers",
                     config={"trainer": {"seed": 1}})
    for step, metrics in enumerate(STEPS, 1):
        log.log(step, metrics, echo=lambda _: None)
    log.close()


def tfrecords(path: Path) -> list[bytes]:
    """Records of a TFRecord file: u64 length, u32 crc, data, u32 crc."""
    data, out, pos = path.read_bytes(), [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        out.append(data[pos + 12:pos + 12 + length])
        pos += 16 + length
    return out


def test_tensorboard_event_file(tmp_path):
    from tensorboardX.proto import event_pb2

    log_steps(tmp_path, ("tensorboard",))
    (events,) = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    scalars: dict[str, dict[int, float]] = {}
    for record in tfrecords(events):
        event = event_pb2.Event.FromString(record)
        for value in event.summary.value:
            scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    assert scalars["reward/accuracy"] == {1: 0.25, 2: 0.5, 3: 0.75}
    assert scalars["policy/grad_norm"] == {1: 1.5, 3: 0.5}  # the NaN is not written


def test_wandb_offline_run(tmp_path, monkeypatch):
    """A real offline W&B run gets each step's finite metrics at its step and the config;
    what W&B then does with them (its run file's format is its own, undocumented) is W&B's:
    the run file is only checked to exist and hold data."""
    import wandb
    from wandb.sdk.wandb_run import Run

    monkeypatch.setenv("WANDB_MODE", "offline")  # no network: the run is written locally
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged: list[tuple[dict, int]] = []
    real_log = Run.log

    def spy(self, data, step=None, **kw):
        logged.append((dict(data), step))
        return real_log(self, data, step=step, **kw)

    monkeypatch.setattr(Run, "log", spy)
    inits: list[dict] = []
    real_init = wandb.init
    monkeypatch.setattr(wandb, "init", lambda **kw: inits.append(kw) or real_init(**kw))
    log_steps(tmp_path, ("wandb",))
    assert logged == [({"reward/accuracy": 0.25, "policy/grad_norm": 1.5}, 1),
                      ({"reward/accuracy": 0.5}, 2),  # the NaN is not written
                      ({"reward/accuracy": 0.75, "policy/grad_norm": 0.5}, 3)]
    assert inits[0]["config"] == {"trainer": {"seed": 1}}
    assert inits[0]["dir"] == str(tmp_path) and inits[0]["project"] == "dapo_jax_test"
    # wandb's service process writes the file: wait for it (an event), not a fixed time.
    files = lambda: [f for f in (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
                     if f.stat().st_size > 0]
    wait_for(lambda: files(), 120, what="the offline W&B run file")


def test_jsonl_writes_null_for_non_finite(tmp_path):
    log_steps(tmp_path, ("jsonl",))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["policy/grad_norm"] is None and not any(
        isinstance(v, float) and not math.isfinite(v) for r in rows for v in r.values())


def test_device_memory_metrics():
    """GPU/TPU devices report their allocator's peak and limit (the most and the least over
    the process's devices); CPU devices report nothing, so no key is logged."""
    import jax

    class Device:
        def __init__(self, peak: float, limit: float):
            self.stats = {"peak_bytes_in_use": peak * 2**30, "bytes_limit": limit * 2**30}

        def memory_stats(self):
            return self.stats

    assert device_memory([Device(3.0, 70.0), Device(5.0, 68.0)]) == {
        "memory/peak_gib": 5.0, "memory/limit_gib": 68.0}
    assert device_memory(jax.local_devices()) == {}
